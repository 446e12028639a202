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
    quantize: "nf4", "fp4" or "int8" quantizes every linear kernel tensor by
      tensor as it is placed (QLoRA; see `jlora.quantize`), so device memory
      stays near the quantized size; or a callable `(path, array) -> leaf`.

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

  Example:
    >>> cfg = LlamaConfig(num_hidden_layers=2)
    >>> model, params = from_config(cfg, jax.random.key(0))
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
  hook = quantize
  if isinstance(quantize, str):
    from jlora.quant import quantizer

    hook = quantizer(quantize)
  params = {}
  for path, struct in expected.items():
    x = _read_leaf(path, plan[path], struct, read, model)
    sharding = rule(path, struct.shape)
    leaf = (
      jax.device_put(x) if sharding is None else jax.device_put(x, sharding)
    )
    params[path] = leaf if hook is None else hook(path, leaf)
  return traverse_util.unflatten_dict(params, sep="/")


def _stacked(path: str, model: CausalLM) -> bool:
  return model.scan_layers and path.startswith("model/layers/")


def _read_leaf(path, sources, struct, read, model) -> np.ndarray:
  def one(src):
    return src.build([read(k) for k in src.keys]).astype(
      struct.dtype, copy=False
    )

  if not _stacked(path, model):
    return one(sources[0])
  # Fill a preallocated stack layer by layer: one stacked parameter in host
  # memory at a time.
  out = np.empty(struct.shape, struct.dtype)
  for i, src in enumerate(sources):
    out[i] = one(src)
  return out
