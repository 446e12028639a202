"""`CausalLM` models from HF safetensors checkpoints or from a config.

Tensors are streamed one at a time (one stacked parameter at a time with
`scan_layers=True`), so host memory stays near one copy of the largest parameter
rather than the whole model. transformers is imported only inside the functions
that need it.

Name mapping, HF -> Flax:

  linear `a.b.weight` (out, in)  -> `a/b/kernel` (in, out), transposed
  `a.b.bias`                     -> `a/b/bias`
  norm `a.weight`                -> `a/scale`
  `model.embed_tokens.weight`    -> `model/embed_tokens/embedding`

With `scan_layers=True`, `model.layers.<i>.<rest>` for every i are stacked into
`model/layers/<rest>` along a new leading axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

# Registers bfloat16 with NumPy, so safetensors can return bf16 arrays.
import ml_dtypes  # noqa: F401
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.models import _moe_loading
from jlora.models.config import ModelConfig
from jlora.models.decoder import CausalLM

Params = dict[str, Any]
ShardingSpec = (
  Callable[[str, tuple[int, ...]], jax.sharding.Sharding]
  | Mapping[str, Any]
  | None
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Checkpoint entries that carry no parameters of ours (old Llama checkpoints
# stored rope buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the architecture its config gives."""


def from_pretrained(
  path_or_id: str | os.PathLike,
  *,
  dtype: Any = None,
  param_dtype: Any = None,
  scan_layers: bool = False,
  remat: str = "none",
  attention: str = "xla",
  mesh: Mesh | None = None,
  shardings: ShardingSpec = None,
  quantize: str | Callable[[str, Any], Any] | None = None,
) -> tuple[CausalLM, Params]:
  """Loads a causal LM (any `SUPPORTED_MODEL_TYPES` family) from a HF checkpoint.

  Args:
    path_or_id: a local directory with config.json and model.safetensors (or a
      sharded model.safetensors.index.json with its shards), or a hub id fetched
      with `huggingface_hub.snapshot_download` when no such directory exists.
    dtype: computation dtype; default `param_dtype`.
    param_dtype: dtype of the returned parameters; default the checkpoint's
      (`config.dtype`), float32 when the config does not say.
    scan_layers, remat, attention: see `CausalLM`.
    mesh: place parameters with the default rule: every parameter of rank >= 2
      is sharded along its last (output) axis over `mesh.axis_names[0]` when
      that axis divides evenly, anything else is replicated.
    shardings: overrides the rule: a callable `(path, shape) -> Sharding` with
      '/'-joined Flax paths, or a params-shaped dict (nested or flat with '/'
      keys) of `Sharding`s.
    quantize: "nf4", "fp4", "int8" or "fp8" quantizes every linear kernel
      tensor by tensor as it is placed (QLoRA; see `jlora.quantize`), and
      with `scan_layers` a stacked kernel layer by layer, so device memory
      stays near the quantized size plus one layer's tensor; or a callable
      `(path, array) -> leaf` (given (1, ...) layer slices of stacked
      parameters, whose leading axis every array it returns keeps).

  Returns:
    `(model, params)`; `model.apply({"params": params}, input_ids)` gives
    float32 logits.

  Raises:
    FileNotFoundError: no config.json, or no safetensors weights, in the
      directory.
    ValueError: the config's `model_type` is not supported.
    CheckpointMismatchError: missing, unexpected or wrongly shaped tensors.

  Example:
    >>> model, params = from_pretrained("Qwen/Qwen2.5-0.5B", dtype=jnp.bfloat16)
    >>> logits = model.apply({"params": params}, jnp.array([[1, 2, 3]]))
  """
  from transformers import AutoConfig

  directory = _resolve(path_or_id)
  if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
    raise FileNotFoundError(
      f"{directory!s} has no {CONFIG_NAME}; from_pretrained needs a "
      "transformers checkpoint directory (config.json + model.safetensors), "
      "e.g. one written by model.save_pretrained(dir)"
    )
  hf_config = AutoConfig.from_pretrained(directory)
  config = ModelConfig.from_hf(hf_config)
  param_dtype = (
    _checkpoint_dtype(hf_config) if param_dtype is None else param_dtype
  )
  dtype = param_dtype if dtype is None else dtype
  model = CausalLM(
    config, dtype, param_dtype, scan_layers, remat, attention
  )
  files = _weight_files(directory)
  with contextlib.ExitStack() as stack:
    from safetensors import safe_open

    handles = {}
    for f in files:
      handle = stack.enter_context(safe_open(f, framework="numpy"))
      handles.update({k: (handle, f) for k in handle.keys()})
    params = _assemble(
      model,
      keys=handles.keys(),
      shape_of=lambda k: tuple(handles[k][0].get_slice(k).get_shape()),
      read=lambda k: handles[k][0].get_tensor(k),
      where=lambda k: handles[k][1],
      mesh=mesh,
      shardings=shardings,
      quantize=quantize,
    )
  return model, params


def from_state_dict(
  model: CausalLM,
  state_dict: Mapping[str, Any],
  *,
  mesh: Mesh | None = None,
  shardings: ShardingSpec = None,
) -> Params:
  """Converts an in-memory HF state dict (torch tensors or arrays) to params.

  Example:
    >>> model = CausalLM(ModelConfig.from_hf(hf_model.config))
    >>> params = from_state_dict(model, hf_model.state_dict())
  """
  return _assemble(
    model,
    keys=state_dict.keys(),
    shape_of=lambda k: tuple(state_dict[k].shape),
    read=lambda k: _to_numpy(state_dict[k]),
    where=lambda k: "state_dict",
    mesh=mesh,
    shardings=shardings,
  )


def from_config(
  hf_config: Any,
  key: jax.Array,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  scan_layers: bool = False,
  remat: str = "none",
  attention: str = "xla",
  mesh: Mesh | None = None,
  shardings: ShardingSpec = None,
  quantize: str | Callable[[str, Any], Any] | None = None,
) -> tuple[CausalLM, Params]:
  """A random model: kernels ~ N(0, initializer_range^2), norms 1, biases 0.

  `hf_config` is a transformers config or a `ModelConfig`. Parameters are
  created directly with their shardings when `mesh` or `shardings` is given.

  With `quantize` ("nf4", "fp4", "int8", "fp8", or a callable `(path, array)
  -> leaf` as in `from_pretrained`) the model is made one decoder layer at a
  time and each layer's kernels are quantized before the next layer exists,
  so memory peaks near the quantized model plus one dense layer, never the
  dense model (a 70B model in NF4 on one GPU). The layers' random values then
  come from `key` per layer (layer i from `fold_in(key_layers, i)`), the same
  with or without `scan_layers`, and differ from the dense path's; a callable
  hook that returns its array unchanged gives that dense model. With
  `scan_layers` the hook sees each stacked parameter one layer at a time, as
  a (1, ...) slice named by the stacked path; the pieces are joined along the
  leading axis of every array the hook returns.

  Example:
    >>> cfg = LlamaConfig(num_hidden_layers=2)
    >>> model, params = from_config(cfg, jax.random.key(0))
    >>> model, qparams = from_config(cfg, jax.random.key(0), quantize="nf4",
    ...                              scan_layers=True)
  """
  config = (
    hf_config
    if isinstance(hf_config, ModelConfig)
    else ModelConfig.from_hf(hf_config)
  )
  model = CausalLM(
    config, dtype, param_dtype, scan_layers, remat, attention
  )
  dummy = jnp.zeros((1, 1), jnp.int32)
  if quantize is not None:
    rule = _sharding_rule(mesh, shardings)
    return model, _init_by_layer(model, key, rule, _quantize_hook(quantize))

  def init(k):
    return model.init(k, dummy)["params"]

  out_shardings = None
  if mesh is not None or shardings is not None:
    shapes = traverse_util.flatten_dict(jax.eval_shape(init, key), sep="/")
    rule = _sharding_rule(mesh, shardings)
    flat = {p: rule(p, s.shape) for p, s in shapes.items()}
    out_shardings = traverse_util.unflatten_dict(flat, sep="/")
  return model, jax.jit(init, out_shardings=out_shardings)(key)


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any):
  """`transformers.AutoTokenizer.from_pretrained(path_or_id, **kwargs)`."""
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path_or_id, **kwargs)


# ----------------------------------------------------------------------------


def _resolve(path_or_id: str | os.PathLike) -> str:
  path = os.fspath(path_or_id)
  if os.path.isdir(path):
    return path
  if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
    raise FileNotFoundError(
      f"{path!r} is not a directory; pass a checkpoint directory or a hub "
      "id such as 'Qwen/Qwen2.5-0.5B'"
    )
  from huggingface_hub import snapshot_download

  return snapshot_download(
    path,
    allow_patterns=[
      "*.json",
      "*.safetensors",
      "*.model",
      "*.txt",
      "tokenizer*",
    ],
  )


def _weight_files(directory: str) -> list[str]:
  index = os.path.join(directory, WEIGHTS_INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = [
      os.path.join(directory, name) for name in sorted(set(weight_map.values()))
    ]
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(
          f"{f} is listed in {index} but missing; download the complete "
          "checkpoint"
        )
    return files
  single = os.path.join(directory, WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  found = sorted(os.listdir(directory))
  raise FileNotFoundError(
    f"{directory} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} "
    f"(found: {found}); only safetensors checkpoints are read: re-save with "
    "model.save_pretrained(dir, safe_serialization=True)"
  )


def _checkpoint_dtype(hf_config: Any):
  name = getattr(hf_config, "dtype", None)
  name = name or getattr(hf_config, "torch_dtype", None)
  name = str(name).removeprefix("torch.") if name is not None else "float32"
  if name not in ("float32", "bfloat16", "float16"):
    return jnp.float32
  return jnp.dtype(name)


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    import torch

    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:  # torch cannot export bf16: go via its bits
      return x.view(torch.int16).numpy().view(jnp.bfloat16)
    return x.numpy()
  return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class _Source:
  """The HF tensors of one leaf (of one layer when stacked), their shapes,
  and how they become the leaf's array."""

  keys: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  build: Callable[[list[np.ndarray]], np.ndarray]


def _transpose(xs):
  return xs[0].T


def _as_is(xs):
  return xs[0]


def _sources(path: str, model: CausalLM, struct, available) -> list[_Source]:
  """How to read the leaf at `path` (one `_Source` per layer when scanned)."""
  parts = path.split("/")
  if model.config.num_experts and _moe_loading.is_expert_leaf(path):
    return _moe_loading.sources(path, model, available, _Source)
  suffix = "bias" if parts[-1] == "bias" else "weight"
  kernel = parts[-1] == "kernel"
  per_layer = struct.shape[1:] if _stacked(path, model) else struct.shape
  shape = (tuple(per_layer[::-1]) if kernel else tuple(per_layer),)
  build = _transpose if kernel else _as_is
  if model.scan_layers and parts[:2] == ["model", "layers"]:
    rest = ".".join(parts[2:-1])
    return [
      _Source((f"model.layers.{i}.{rest}.{suffix}",), shape, build)
      for i in range(model.config.num_layers)
    ]
  return [_Source((".".join(parts[:-1] + [suffix]),), shape, build)]


def _default_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  axis = mesh.axis_names[0]
  if len(shape) >= 2 and shape[-1] % mesh.shape[axis] == 0:
    return NamedSharding(
      mesh, PartitionSpec(*([None] * (len(shape) - 1)), axis)
    )
  return NamedSharding(mesh, PartitionSpec())


def _sharding_rule(mesh: Mesh | None, shardings: ShardingSpec):
  """`(path, shape) -> Sharding | None` from `mesh` and `shardings`."""
  if shardings is None:
    if mesh is None:
      return lambda path, shape: None
    return lambda path, shape: _default_sharding(tuple(shape), mesh)
  if callable(shardings):
    return lambda path, shape: shardings(path, tuple(shape))
  flat = dict(shardings)
  if not all(isinstance(k, str) and "/" in k for k in flat):
    flat = traverse_util.flatten_dict(flat, sep="/")

  def lookup(path, shape):
    if path not in flat:
      raise KeyError(
        f"shardings has no entry for parameter {path!r}; give one for every "
        "leaf"
      )
    return flat[path]

  return lookup


def _assemble(
  model: CausalLM,
  *,
  keys: Iterator[str],
  shape_of: Callable[[str], tuple[int, ...]],
  read: Callable[[str], np.ndarray],
  where: Callable[[str], str],
  mesh: Mesh | None,
  shardings: ShardingSpec,
  quantize: str | Callable[[str, Any], Any] | None = None,
) -> Params:
  """Checks all tensors against `model`'s shapes, then reads and places them."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))
  expected = traverse_util.flatten_dict(shapes["params"], sep="/")
  available = set(keys)
  plan = {
    path: _sources(path, model, struct, available)
    for path, struct in expected.items()
  }

  needed = {k for srcs in plan.values() for src in srcs for k in src.keys}
  missing = sorted(needed - available)
  if missing:
    raise CheckpointMismatchError(
      f"checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. "
      f"{missing[:5]}; check that config.json (num_hidden_layers, "
      "tie_word_embeddings, attention_bias) belongs to these weights"
    )
  ignorable = {k for k in available if k.endswith(_IGNORED_SUFFIXES)}
  if model.config.tie_word_embeddings:
    # Tied checkpoints may still store the shared matrix under lm_head.
    ignorable.add("lm_head.weight")
  unexpected = sorted(available - needed - ignorable)
  if unexpected:
    raise CheckpointMismatchError(
      f"checkpoint has {len(unexpected)} tensor(s) the config does not use, "
      f"e.g. {unexpected[:5]} (in {where(unexpected[0])}); check that "
      "config.json "
      "(num_hidden_layers, tie_word_embeddings, model_type) belongs to these "
      "weights"
    )
  for path in expected:
    for src in plan[path]:
      for k, hf_shape in zip(src.keys, src.shapes):
        found = tuple(shape_of(k))
        if found != tuple(hf_shape):
          raise CheckpointMismatchError(
            f"tensor {k!r} in {where(k)} has shape {found}, expected "
            f"{tuple(hf_shape)} for parameter {path!r}; config.json does not "
            "match the weights"
          )

  rule = _sharding_rule(mesh, shardings)
  hook = _quantize_hook(quantize)
  params = {}
  for path, struct in expected.items():
    sharding = rule(path, struct.shape)
    if hook is not None and _stacked(path, model):
      # Quantizing: one layer's tensor at a time on the device, never the
      # dense stack.
      stack = _Stack(model.config.num_layers)
      piece = _slice_sharding(sharding)
      for i, src in enumerate(plan[path]):
        x = _read_one(src, struct.dtype, read)[None]
        stack.put(path, i, hook(path, _place(x, piece)), sharding)
      params[path] = stack.result()
      continue
    x = _read_leaf(path, plan[path], struct, read, model)
    leaf = _place(x, sharding)
    params[path] = leaf if hook is None else hook(path, leaf)
  return traverse_util.unflatten_dict(params, sep="/")


def _place(x, sharding):
  return jax.device_put(x) if sharding is None else jax.device_put(x, sharding)


def _quantize_hook(quantize):
  """`quantize` as a `(path, array) -> leaf` hook (None: no quantization)."""
  if isinstance(quantize, str):
    from jlora.quant import quantizer

    return quantizer(quantize)
  if quantize is not None and not callable(quantize):
    raise TypeError(
      f"quantize={quantize!r}; give a method name ('nf4', 'fp4', 'int8', "
      "'fp8') or a callable (path, array) -> leaf"
    )
  return quantize


def _slice_sharding(sharding):
  """The sharding of a (1, ...) layer slice of a stacked parameter."""
  if isinstance(sharding, NamedSharding) and len(sharding.spec):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec[1:]))
  return sharding


class _Stack:
  """Joins per-layer pieces into stacked leaves, in place.

  Each piece is what the quantize hook made of one (1, ...) layer slice (an
  array or a pytree such as a `QuantizedArray`); every array in it keeps the
  leading axis of length 1. The stacked arrays are allocated at the first
  piece and each layer is written into them by a donated update, so the
  stack exists once, never as pieces plus a concatenated copy.
  """

  def __init__(self, num_layers: int):
    self.num_layers = num_layers
    self.treedef = None
    self.buffers: list[jax.Array] = []

  def put(self, path: str, i: int, piece: Any, sharding=None) -> None:
    leaves, treedef = jax.tree.flatten(piece)
    bad = [tuple(x.shape) for x in leaves if x.ndim == 0 or x.shape[0] != 1]
    if bad:
      raise ValueError(
        f"the quantize hook returned arrays of shapes {bad} for layer {i} of "
        f"{path!r}; it gets a (1, ...) slice of a stacked parameter and must "
        "keep that leading axis in every array it returns (or load with "
        "scan_layers=False)"
      )
    if self.treedef is None:
      self.treedef = treedef
      self.buffers = [
        _zeros(
          (self.num_layers, *x.shape[1:]), x.dtype, _stack_sharding(x, sharding)
        )
        for x in leaves
      ]
    elif treedef != self.treedef:
      raise ValueError(
        f"the quantize hook returned {treedef} for layer {i} of {path!r} but "
        f"{self.treedef} for layer 0; it must treat every layer alike"
      )
    self.buffers = [
      _write_layer(b, x, jnp.int32(i)) for b, x in zip(self.buffers, leaves)
    ]

  def result(self) -> Any:
    return jax.tree.unflatten(self.treedef, self.buffers)


def _stack_sharding(piece: jax.Array, stacked_sharding):
  """A stacked buffer's sharding: the piece's, with the stack's layer axis."""
  sharding = getattr(piece, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return sharding
  lead = None
  if isinstance(stacked_sharding, NamedSharding) and len(stacked_sharding.spec):
    lead = stacked_sharding.spec[0]
  spec = tuple(sharding.spec) + (None,) * (piece.ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh, PartitionSpec(lead, *spec[1:]))


def _zeros(shape, dtype, sharding):
  return jnp.zeros(shape, dtype, device=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(buffer, piece, i):
  return lax.dynamic_update_index_in_dim(buffer, piece[0], i, 0)


def _one_layer(config: ModelConfig) -> ModelConfig:
  """`config` with only its first decoder layer (per-layer tuples cut)."""
  n = config.num_layers
  cut = {
    f.name: getattr(config, f.name)[:1]
    for f in dataclasses.fields(config)
    if isinstance(getattr(config, f.name), tuple)
    and len(getattr(config, f.name)) == n
  }
  return dataclasses.replace(config, num_layers=1, **cut)


def _init_by_layer(model: CausalLM, key, rule, hook) -> Params:
  """`from_config`'s params made and quantized one decoder layer at a time.

  A one-layer copy of the model gives every parameter its initializer: its
  layer ("model/layers/0") is initialised once per layer of the real model
  (layer i from `fold_in(layer_key, i)`), its other parameters (embedding,
  final norm, head) once from `rest_key`. Each is a small jitted program
  whose outputs are only the parameters asked for, so XLA computes nothing
  else.
  """
  config, n = model.config, model.config.num_layers
  dummy = jnp.zeros((1, 1), jnp.int32)
  def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")

  expected = flat(jax.eval_shape(model.init, key, dummy)["params"])
  one = CausalLM(_one_layer(config), model.dtype, model.param_dtype, False,
                 "none", model.attention)
  one_shapes = flat(jax.eval_shape(one.init, key, dummy)["params"])
  prefix = "model/layers/0/"
  layer_shapes = {
    p[len(prefix):]: s for p, s in one_shapes.items() if p.startswith(prefix)
  }
  rest_shapes = {
    p: s for p, s in one_shapes.items() if not p.startswith("model/layers/")
  }

  def full_path(name: str, i: int) -> str:
    return (
      f"model/layers/{name}" if model.scan_layers
      else f"model/layers/{i}/{name}"
    )

  for i in range(1 if model.scan_layers else n):
    want = {
      full_path(name, i): ((n, *s.shape) if model.scan_layers else s.shape)
      for name, s in layer_shapes.items()
    }
    got = {p: tuple(expected[p].shape) for p in want if p in expected}
    if got != {p: tuple(s) for p, s in want.items()}:
      raise NotImplementedError(
        f"decoder layer {i} of this {config.model_type} model has other "
        "parameters than its first layer; quantize=... initialises every "
        "layer like the first. Create the dense model (quantize=None) and "
        "jlora.quantize it"
      )

  rest_key, layer_key = jax.random.split(key)
  params: dict[str, Any] = {}

  # Embedding, final norm, head: at most as large as one dense layer each.
  shardings = {p: rule(p, expected[p].shape) for p in rest_shapes}
  make_rest = _init_program(
    one, dummy, lambda p: p if p in rest_shapes else None, shardings
  )
  for path, x in make_rest(rest_key).items():
    params[path] = hook(path, x)

  # Decoder layers, each quantized before the next is made.
  stacked = {
    name: rule(full_path(name, 0), expected[full_path(name, 0)].shape)
    for name in layer_shapes
  }

  def layer_name(p):
    return p[len(prefix):] if p.startswith(prefix) else None

  if model.scan_layers:
    make_layer = _init_program(
      one, dummy, layer_name,
      {k: _slice_sharding(v) for k, v in stacked.items()}, lead_axis=True,
    )
    stacks = {name: _Stack(n) for name in layer_shapes}
    for i in range(n):
      for name, x in make_layer(jax.random.fold_in(layer_key, i)).items():
        path = full_path(name, i)
        stacks[name].put(path, i, hook(path, x), stacked[name])
    for name, stack in stacks.items():
      params[full_path(name, 0)] = stack.result()
  else:
    programs = {}  # one program per distinct placement (usually one)
    for i in range(n):
      shardings = {
        name: rule(full_path(name, i), expected[full_path(name, i)].shape)
        for name in layer_shapes
      }
      placement = tuple(shardings.items())
      if placement not in programs:
        programs[placement] = _init_program(one, dummy, layer_name, shardings)
      make_layer = programs[placement]
      for name, x in make_layer(jax.random.fold_in(layer_key, i)).items():
        path = full_path(name, i)
        params[path] = hook(path, x)
  return traverse_util.unflatten_dict(params, sep="/")


def _init_program(model, dummy, rename, shardings, lead_axis=False):
  """A jitted `key -> {name: array}` of the parameters `rename` keeps.

  `rename(path)` gives a kept parameter's name or None; `lead_axis` adds a
  leading axis of length 1 (a layer slice of a stacked parameter).
  """

  def make(k):
    flat = traverse_util.flatten_dict(model.init(k, dummy)["params"], sep="/")
    out = {}
    for path, x in flat.items():
      name = rename(path)
      if name is not None:
        out[name] = x[None] if lead_axis else x
    return out

  if any(s is None for s in shardings.values()):
    # Some placement left to the default device: place afterwards.
    def placed(k):
      out = jax.jit(make)(k)
      return {
        n: x if shardings[n] is None else jax.device_put(x, shardings[n])
        for n, x in out.items()
      }

    return placed
  return jax.jit(make, out_shardings=shardings)


def _stacked(path: str, model: CausalLM) -> bool:
  return model.scan_layers and path.startswith("model/layers/")


def _read_one(src, dtype, read) -> np.ndarray:
  """One parameter (or one layer of it) in our layout and dtype."""
  return src.build([read(k) for k in src.keys]).astype(dtype, copy=False)


def _read_leaf(path, sources, struct, read, model) -> np.ndarray:
  def one(src):
    return _read_one(src, struct.dtype, read)

  if not _stacked(path, model):
    return one(sources[0])
  # Fill a preallocated stack layer by layer: one stacked parameter in host
  # memory at a time.
  out = np.empty(struct.shape, struct.dtype)
  for i, src in enumerate(sources):
    out[i] = one(src)
  return out
