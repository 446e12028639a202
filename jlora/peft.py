"""HuggingFace PEFT adapter files, both ways: `save` and `load`.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. For a transformers model whose module names
mirror the Flax param paths (as `jlora.models` does), the two correspond
one to one::

    jlora path   model/layers/0/self_attn/q_proj/kernel      w (in, out)
    PEFT module  model.layers.0.self_attn.q_proj             W (out, in)

    a (in, r)  <->  base_model.model.<module>.lora_A.weight           [r, in]
    b (r, out) <->  base_model.model.<module>.lora_B.weight           [out, r]
    m (out,)   <->  base_model.model.<module>.lora_magnitude_vector   [out]

so ``lora_A = a.T`` and ``lora_B = b.T``, and PEFT's update
``scale * B @ A`` is the transpose of jlora's ``scale * a @ b``. A scanned
kernel (``model/layers/self_attn/q_proj/kernel``, shape (L, in, out),
layout 'bio') is one PEFT module per layer: the layer index goes after the
``layers`` path segment.

Stacked expert kernels (E, in, out), layout 'bio' ('bbio' scanned), are
PEFT's ``target_parameters``: the 3-D parameter
``model.layers.0.mlp.experts.gate_up_proj`` of transformers 5, wrapped by a
``ParamWrapper`` whose factors hold every expert::

    a (E, in, r)   <->  lora_A.weight [r * E, in]    row e * r + k = a[e, :, k]
    b (E, r, out)  <->  lora_B.weight [out, r * E]   col k * E + e = b[e, k, :]

under the key of the wrapper (``...mlp.experts`` for the outermost of a
module's wrapped parameters, ``...mlp.experts.base_layer`` for the one it
wraps; see `jlora._peft_config.wrapper_names`).

Scale: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module
through ``rank_pattern`` / ``alpha_pattern``. DoRA (``use_dora``): the fused
kernel is ``m * W' / ||W'||``, norms per output, in both libraries.

Example:
  >>> jlora.peft.save(lora_params, "out/adapter", base_model_name_or_path=mid)
  >>> peft_model = peft.PeftModel.from_pretrained(hf_model, "out/adapter")
  >>> lora_params = jlora.peft.load("out/adapter", params)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (NumPy bfloat16 for safetensors)
import numpy as np

from jlora import _paths
from jlora import _peft_config as cfg
from jlora._peft_config import PeftFormatError
from jlora.inject import _adapter_shardings
from jlora.node import (LoRA, base_array, check_single, default_layout,
                        is_lora)
from jlora.targets import HEAD_PATTERN, is_matrix

__all__ = ["PeftFormatError", "load", "module_names", "save"]

_A, _B = "lora_A.weight", "lora_B.weight"
_M, _M_OLD = "lora_magnitude_vector", "lora_magnitude_vector.weight"
_BASE = "base_layer.weight"


@dataclasses.dataclass
class _Module:
  """A kernel of the params tree, as one or more PEFT modules (a Linear) or
  wrapped parameters (stacked experts)."""
  path: str
  leaf: Any
  layout: str
  names: list[str]  # one per stacked layer: module name, or parameter key
  param: bool = False  # (E, in, out) experts: PEFT's target_parameters
  scanned: bool = False  # a leading layer axis


def _module_name(path: str, layers_key: str, index: int | None) -> str:
  parts = path.split("/")[:-1]
  if index is not None:
    at = next(k for k in range(len(parts) - 1) if parts[k] == layers_key
              and not parts[k + 1].isdigit())
    parts = parts[:at + 1] + [str(index)] + parts[at + 1:]
  return ".".join(parts)


def _stack_slot(path: str, layers_key: str) -> bool:
  parts = path.split("/")[:-1]
  return any(parts[k] == layers_key and not parts[k + 1].isdigit()
             for k in range(len(parts) - 1))


def _modules(tree: Any, layers_key: str) -> Iterator[_Module]:
  """Kernels (leaves named 'kernel') that map to PEFT modules or to wrapped
  expert parameters."""
  for path, leaf in _paths.leaves_with_path(tree):
    if path.rsplit("/", 1)[-1] != "kernel":
      continue
    if is_lora(leaf):
      layout = leaf.layout
      shape = leaf.shape if leaf.w is not None else None
    elif is_matrix(leaf):
      layout, shape = default_layout(leaf.ndim), tuple(leaf.shape)
    else:
      continue
    scanned = layout.startswith("b") and _stack_slot(path, layers_key)
    inner = layout[1:] if scanned else layout
    if inner not in ("io", "bio"):
      if is_lora(leaf):
        raise PeftFormatError(
            f"LoRA node '{path}' has layout '{layout}'; a PEFT Linear adapter"
            " needs a 2-D (in, out) kernel ('io') and a PEFT expert parameter"
            " a stacked (experts, in, out) one ('bio'), either with a leading"
            f" layer axis when scanned under a '{layers_key}' path segment")
      continue
    if scanned:
      layers = shape[0] if shape is not None else leaf.a.shape[0]
      names = [_module_name(path, layers_key, i) for i in range(layers)]
    else:
      names = [_module_name(path, layers_key, None)]
    yield _Module(path, leaf, layout, names, inner == "bio", scanned)


def module_names(params: Any, *, layers_key: str = "layers") -> list[str]:
  """PEFT module names of the linear kernels of `params`, in tree order
  (stacked expert kernels, PEFT parameters, are left out).

  >>> jlora.peft.module_names(params)[:2]
  ['lm_head', 'model.layers.0.mlp.down_proj']
  """
  return [n for m in _modules(params, layers_key) if not m.param
          for n in m.names]


def _wrappers(modules: list[_Module], keys) -> dict[str, str]:
  """Parameter key -> PEFT wrapper module name, for the `keys` adapted."""
  keys = set(keys)
  return cfg.wrapper_names([n for m in modules if m.param for n in m.names
                            if n in keys])


def _to_peft(node: LoRA, index: int | None, param: bool):
  """(lora_A, lora_B) of one layer of a node, as PEFT stores them."""
  a, b = _host(node.a, index), _host(node.b, index)
  if not param:
    return a.T, b.T
  e, fan_in, r = a.shape
  return (a.transpose(0, 2, 1).reshape(e * r, fan_in),
          b.transpose(2, 1, 0).reshape(b.shape[2], r * e))


def _from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int | None):
  """(a, b) of one layer from PEFT's lora_A, lora_B (float64 arrays)."""
  if experts is None:
    return lora_a.T, lora_b.T
  r = lora_a.shape[0] // experts
  a = lora_a.reshape(experts, r, -1).transpose(0, 2, 1)
  b = lora_b.reshape(lora_b.shape[0], r, experts).transpose(2, 1, 0)
  return a, b


# --------------------------------------------------------------------- save


def _check_expert_node(path: str, node: LoRA) -> None:
  """PEFT's ParamWrapper refuses DoRA and dropout."""
  if node.m is not None:
    raise PeftFormatError(
        f"LoRA node '{path}' on stacked experts has a DoRA magnitude m;"
        " PEFT's target_parameters (ParamWrapper) has no DoRA: save the"
        " expert adapters without dora=True")
  if node.dropout:
    raise PeftFormatError(
        f"LoRA node '{path}' on stacked experts has dropout={node.dropout};"
        " PEFT's target_parameters (ParamWrapper) refuses lora_dropout != 0:"
        " use dropout=0.0 for the experts (and so for every node, PEFT's"
        " config has one lora_dropout)")


def _check_node(path: str, node: LoRA) -> None:
  if node.a is None or node.b is None or node.w is None:
    raise PeftFormatError(
        f"LoRA node '{path}' is one half of a partition (w, a or b is None);"
        " pass jlora.combine(trainable, frozen)")
  if node.e is not None:
    raise PeftFormatError(
        f"LoRA node '{path}' has field e (AdaLoRA per-rank gains), which a"
        " PEFT LoRA adapter cannot hold; fold them into b first:"
        " dataclasses.replace(node, b=node.e[..., :, None] * node.b, e=None)")
  for field in ("a", "b", "m"):
    x = getattr(node, field)
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise PeftFormatError(
          f"LoRA node '{path}' has {field} of dtype {jnp.dtype(x.dtype).name};"
          " LoRA factors are floating point: cast them (e.g. with"
          " jax.tree.map) before saving")


def _global(nodes: list[tuple[str, LoRA]], field: str, value) -> Any:
  values = {value(n) for _, n in nodes}
  if len(values) > 1:
    example = {v: next(p for p, n in nodes if value(n) == v) for v in values}
    raise PeftFormatError(
        f"PEFT's adapter_config.json has one {field} for all modules but"
        f" these LoRA nodes differ: {example}; save them as separate adapters")
  return values.pop()


def _check_finite(tensors: dict[str, np.ndarray]) -> None:
  for key, value in tensors.items():
    bad = value.size - int(np.count_nonzero(np.isfinite(
        value.astype(np.float32))))
    if bad:
      # jlora.peft.load (and any PEFT model) would only produce NaNs.
      raise PeftFormatError(
          f"'{key}' would hold {bad} non-finite value{'s' * (bad > 1)} (inf"
          " or NaN): the adapter has diverged. Keep training state with"
          " jlora.save_adapter; export to PEFT a finite adapter")


def _host(x: Any, index: int | None) -> np.ndarray:
  return np.asarray(x if index is None else x[index])


def save(tree: Any, directory: str | os.PathLike, *,
         base_model_name_or_path: str | None = None,
         task_type: str | None = "CAUSAL_LM",
         layers_key: str = "layers") -> None:
  """Writes the adapters of a LoRA tree as a PEFT LoRA adapter directory.

  Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as peft
  0.21's ``save_pretrained`` does, so that
  ``peft.PeftModel.from_pretrained(hf_model, directory)`` reproduces
  ``jlora.wrap(model.apply)``'s outputs. Tensors keep their own dtype;
  ``lora_A = a.T`` [r, in], ``lora_B = b.T`` [out, r] and, for DoRA,
  ``lora_magnitude_vector = m`` [out], one key per layer for a scanned
  kernel. ``target_modules`` lists module-name suffixes (``q_proj``) when
  every such module is adapted, full names otherwise; per-module ranks and
  alphas go to ``rank_pattern`` / ``alpha_pattern``.

  Args:
    tree: a LoRA tree holding its base (`jlora.apply`'s output, or
      ``jlora.combine(trainable, frozen)``), e.g. over `jlora.models` params.
    directory: created if missing; existing files of the same names are
      replaced.
    base_model_name_or_path: recorded in the config (PEFT's
      ``from_pretrained`` of an ``AutoPeftModel`` loads it).
    task_type: PEFT task type, ``"CAUSAL_LM"`` by default.
    layers_key: path segment of a scanned layer stack; a stacked kernel's
      layer index is inserted after it.

  Raises:
    PeftFormatError (a ValueError): a node PEFT cannot express: AdaLoRA
      gains ``e``, a layout other than 'io' / scanned 'bio', a partition
      half, or nodes disagreeing on rslora, dropout or DoRA.

  Example:
    >>> lp = jlora.apply(params, rank=8, targets="q_proj|v_proj", key=key)
    >>> jlora.peft.save(lp, "adapter", base_model_name_or_path="Qwen/...")
  """
  from safetensors.numpy import save_file

  for _, x in _paths.leaves_with_path(tree):
    if is_lora(x):
      check_single(x, "jlora.peft.save")
  modules = list(_modules(tree, layers_key))
  nodes = [(m.path, m.leaf) for m in modules if is_lora(m.leaf)]
  if not nodes:
    raise PeftFormatError(
        "jlora.peft.save found no LoRA node on a linear kernel (a leaf named"
        " 'kernel'); call jlora.apply(params, ...) first")
  for path, node in nodes:
    _check_node(path, node)
  for m in modules:
    if m.param and is_lora(m.leaf):
      _check_expert_node(m.path, m.leaf)
  other = [p for p, x in _paths.leaves_with_path(tree)
           if is_lora(x) and not p.endswith("/kernel")]
  if other:
    raise PeftFormatError(
        f"LoRA nodes on {other} are not on a linear kernel (a leaf named"
        " 'kernel'); jlora.peft.save writes Linear adapters only (embedding"
        " adapters are not supported)")
  rslora = _global(nodes, "use_rslora", lambda n: n.rslora)
  dropout = _global(nodes, "lora_dropout", lambda n: n.dropout)
  dora = _global(nodes, "use_dora (DoRA magnitude m)",
                 lambda n: n.m is not None)

  adapted = {n for m in modules if m.param and is_lora(m.leaf)
             for n in m.names}
  wrapper = _wrappers(modules, adapted)
  tensors, ranks, alphas = {}, {}, {}
  for m in modules:
    if not is_lora(m.leaf):
      continue
    node = m.leaf
    for i, name in enumerate(m.names):
      index = i if m.scanned else None
      key = cfg.KEY_PREFIX + (wrapper[name] if m.param else name)
      lora_a, lora_b = _to_peft(node, index, m.param)
      tensors[f"{key}.{_A}"] = np.ascontiguousarray(lora_a)
      tensors[f"{key}.{_B}"] = np.ascontiguousarray(lora_b)
      if dora:
        tensors[f"{key}.{_M}"] = _host(node.m, index)
      ranks[name], alphas[name] = node.rank, cfg.number(node.alpha)
  _check_finite(tensors)
  r, rank_pattern = cfg.patterns(ranks)
  alpha, alpha_pattern = cfg.patterns(alphas)
  linear = [n for m in modules if not m.param for n in m.names]
  experts = [n for m in modules if m.param for n in m.names]
  config = dict(cfg.DEFAULTS)
  config.update(
      r=r, lora_alpha=alpha, rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern, use_rslora=rslora, use_dora=dora,
      lora_dropout=dropout,
      target_modules=cfg.target_modules(set(ranks) - adapted, linear),
      target_parameters=(cfg.target_modules(adapted, experts, segments=2)
                         if adapted else None),
      task_type=task_type, base_model_name_or_path=base_model_name_or_path)
  # Written beside `directory`, swapped in whole; never over a non-PEFT dir.
  from jlora import _atomic_dir  # pylint: disable=import-outside-toplevel
  with _atomic_dir.replace_dir(directory, _atomic_dir.PEFT) as tmp:
    tmp = os.fspath(tmp)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, cfg.WEIGHTS_NAME),
              metadata={"format": "pt"})
    cfg.write(tmp, config)


# --------------------------------------------------------------------- load


def _read_tensors(directory: str) -> dict[str, dict[str, np.ndarray]]:
  """File tensors grouped by module name: {module: {field: array}}."""
  from safetensors.numpy import load_file

  path = os.path.join(directory, cfg.WEIGHTS_NAME)
  if not os.path.isfile(path):
    other = [n for n in ("adapter_model.bin", "adapter_model.pt")
             if os.path.isfile(os.path.join(directory, n))]
    hint = (f"; the directory has {other[0]}, a pickled torch file, which"
            " jlora does not unpickle. Convert it where torch is installed:"
            " safetensors.torch.save_file(torch.load(bin, weights_only=True),"
            f" '{cfg.WEIGHTS_NAME}')" if other else "")
    raise FileNotFoundError(
        f"{path} not found; jlora.peft.load reads safetensors adapters as"
        f" written by PeftModel.save_pretrained (safe_serialization=True)"
        f"{hint}")
  try:
    tensors = load_file(path)
  except Exception as e:  # safetensors' own error type is not exported
    raise PeftFormatError(
        f"cannot read {path} ({e}); the file is truncated or not a"
        " safetensors file: save the adapter again") from e
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    field = next((f for f in (_A, _B, _M_OLD, _M, _BASE)
                  if key.endswith("." + f)), None)
    if not key.startswith(cfg.KEY_PREFIX) or field is None:
      hint = (" (an embedding adapter; jlora.peft.load reads Linear adapters"
              " only)" if "lora_embedding" in key else "")
      raise PeftFormatError(
          f"unexpected key '{key}' in {path}{hint}; expected keys"
          f" '{cfg.KEY_PREFIX}<module>.{{{_A}, {_B}, {_M}}}'")
    module = key[len(cfg.KEY_PREFIX):-len(field) - 1]
    field = _M if field == _M_OLD else field
    if field in groups.get(module, {}):
      raise PeftFormatError(
          f"'{cfg.KEY_PREFIX}{module}.{_M}' and '.{_M_OLD}' are both in"
          f" {path}: two magnitude vectors for one module")
    groups.setdefault(module, {})[field] = value
  return groups


def _adapter_dtype(groups, dtype) -> np.dtype:
  """The one dtype of every adapter array (see `load`)."""
  if dtype is not None:
    try:
      chosen = jnp.dtype(dtype)
    except TypeError as e:
      raise PeftFormatError(f"dtype={dtype!r} is not a dtype") from e
    if not jnp.issubdtype(chosen, jnp.floating):
      raise PeftFormatError(
          f"dtype={chosen.name}: LoRA factors are floating point (an integer"
          " adapter would truncate its scale); pass a float dtype, or None"
          " for the file's widest")
    return chosen
  floats = {t.dtype for g in groups.values() for f, t in g.items()
            if f != _BASE and jnp.issubdtype(t.dtype, jnp.floating)}
  if not floats:
    return jnp.dtype(jnp.float32)
  wide = functools.reduce(jnp.promote_types, sorted(floats, key=str))
  return jnp.dtype(jax.dtypes.canonicalize_dtype(wide))


def _exact(key: str, array: np.ndarray, scale: float = 1.0) -> np.ndarray:
  """float64 values of a file tensor (times scale); raises on inf/NaN."""
  values = np.asarray(array).astype(np.float64)
  bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
  if bad:
    raise PeftFormatError(
        f"'{key}' has {bad} non-finite value{'s' * (bad > 1)} (inf or NaN);"
        " the adapter is broken (a diverged run?), and would make every"
        " output NaN")
  return values * scale if scale != 1.0 else values


def _fits(key: str, values: np.ndarray, dtype: np.dtype) -> None:
  """Raises if a finite value would overflow to inf in `dtype`."""
  with np.errstate(over="ignore"):
    cast = values.astype(dtype)
  if not np.isfinite(cast.astype(np.float64)).all():
    raise PeftFormatError(
        f"'{key}' has values up to {np.abs(values).max():.6g}, beyond"
        f" {dtype.name}'s range (largest {float(jnp.finfo(dtype).max):.6g});"
        f" in {dtype.name} they would be inf. Load with a wider dtype, e.g."
        " dtype=jnp.float32 (the default, dtype=None, takes the file's"
        " widest)")


def _expect(key: str, array: np.ndarray, shape: tuple[int, ...],
            hint: str = "") -> None:
  if tuple(array.shape) != tuple(shape):
    raise PeftFormatError(
        f"'{key}' has shape {list(array.shape)} but the base kernel and the"
        f" config give {list(shape)}; was the adapter trained on another"
        f" model or with another r / rank_pattern?{hint}")


def _place(x: jax.Array, sharding) -> jax.Array:
  return x if sharding is None else jax.device_put(x, sharding)


def _build_node(module: _Module, groups, config, dtype, hint,
                keys=None) -> LoRA:
  """One LoRA node from the file tensors of the module's layers.

  `groups` maps each layer's name to its tensors; `keys` maps a wrapped
  parameter's name to the file's module name (default: the name itself).
  """
  w = module.leaf
  stacked = module.scanned
  fan_in, fan_out = w.shape[-2:]
  experts = w.shape[-3] if module.param else None
  inner = () if experts is None else (experts,)
  use_rslora, use_dora = config["use_rslora"], config["use_dora"]
  keys = keys or {}
  per_layer = []  # (rank, alpha, scale, tensors), None for a layer left out
  for name in module.names:
    t = groups.get(name)
    if t is None:
      per_layer.append(None)
      continue
    key = cfg.KEY_PREFIX + keys.get(name, name)
    r = cfg.pattern_value(config["rank_pattern"], name, config["r"])
    alpha = cfg.pattern_value(config["alpha_pattern"], name,
                              config["lora_alpha"])
    for field in (_A, _B) + ((_M,) if use_dora else ()):
      if field not in t:
        raise PeftFormatError(
            f"missing key '{key}.{field}' for targeted module '{name}'")
    if not use_dora and _M in t:
      raise PeftFormatError(
          f"unexpected key '{key}.{_M}': the config has use_dora=false")
    if module.param and _BASE in t:
      raise PeftFormatError(
          f"unexpected key '{key}.{_BASE}': '{name}' is a wrapped expert"
          " parameter, whose base PEFT never saves")
    width = r * (experts or 1)
    _expect(f"{key}.{_A}", t[_A], (width, fan_in), hint)
    _expect(f"{key}.{_B}", t[_B], (fan_out, width), hint)
    if use_dora:
      _expect(f"{key}.{_M}", t[_M], (fan_out,))
    if _BASE in t:
      # A Conv1D base (fan_in_fan_out) stores its weight (in, out).
      _expect(f"{key}.{_BASE}", t[_BASE], (fan_in, fan_out)
              if config["fan_in_fan_out"] else (fan_out, fan_in))
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    per_layer.append((r, alpha, scale, t))

  present = [x for x in per_layer if x is not None]
  if len(present) == len(per_layer) and len(
      {(x[0], x[1]) for x in present}) == 1:
    rank, alpha, fold = present[0][0], float(present[0][1]), False
  else:
    # Layers of one scanned kernel with different ranks or alphas, or left
    # out: zero-pad to the largest rank and fold each layer's scale into b,
    # the node's own scale being 1.
    rank = max(x[0] for x in present)
    alpha, fold = (math.sqrt(rank) if use_rslora else float(rank)), True

  # float64 on the host: every file dtype converts exactly, and each value
  # is rounded once, into `dtype`.
  a = np.zeros((len(per_layer), *inner, fan_in, rank))
  b = np.zeros((len(per_layer), *inner, rank, fan_out))
  m = np.zeros((len(per_layer), fan_out)) if use_dora else None
  new_base = {}
  for i, x in enumerate(per_layer):
    if x is None:
      if use_dora:
        # A layer PEFT leaves alone: zero update, magnitude = its own norms.
        m[i] = np.linalg.norm(
            np.asarray(base_array(w)[i], np.float32), axis=0)
      continue
    r, _, scale, t = x
    key = cfg.KEY_PREFIX + keys.get(module.names[i], module.names[i])
    a_i, b_i = _from_peft(_exact(f"{key}.{_A}", t[_A]),
                          _exact(f"{key}.{_B}", t[_B],
                                 scale if fold else 1.0), experts)
    a[i, ..., :r] = a_i
    b[i, ..., :r, :] = b_i
    _fits(f"{key}.{_A}", a[i], dtype)
    _fits(f"{key}.{_B}", b[i], dtype)
    if use_dora:
      m[i] = _exact(f"{key}.{_M}", t[_M])
      _fits(f"{key}.{_M}", m[i], dtype)
    if _BASE in t:
      # PEFT saves the base weight of a targeted output head along with the
      # adapter, and loads it over the model's own: do the same.
      base = np.asarray(t[_BASE])
      new_base[i] = base if config["fan_in_fan_out"] else base.T
  if not stacked:
    a, b, m = a[0], b[0], (None if m is None else m[0])
  if new_base:
    base = np.array(base_array(w))
    if stacked:
      for i, v in new_base.items():
        base[i] = v
    else:
      base = new_base[0]
    w = _place(jnp.asarray(base, w.dtype), getattr(w, "sharding", None))
  a_sharding, b_sharding = _adapter_shardings(w, module.layout)
  m_sharding = None
  if b_sharding is not None:
    spec = tuple(b_sharding.spec)
    m_sharding = jax.sharding.NamedSharding(
        b_sharding.mesh, jax.sharding.PartitionSpec(*spec[:-2], spec[-1]))
  return LoRA(
      w=w,
      a=_place(jnp.asarray(a.astype(dtype)), a_sharding),
      b=_place(jnp.asarray(b.astype(dtype)), b_sharding),
      m=None if m is None else _place(jnp.asarray(m.astype(dtype)),
                                      m_sharding),
      alpha=alpha, layout=module.layout, rslora=use_rslora,
      path=module.path, dropout=float(config["lora_dropout"]))


def load(directory: str | os.PathLike, params: Any, *, dtype: Any = None,
         layers_key: str = "layers") -> Any:
  """Attaches a PEFT LoRA adapter to Flax params; returns the LoRA tree.

  Reads what ``PeftModel.save_pretrained`` writes for a transformers model
  whose module names mirror the params' paths (`jlora.models`, scanned or
  not) and gives each adapted kernel a `LoRA` node with ``a = lora_A.T``,
  ``b = lora_B.T`` (and ``m = lora_magnitude_vector`` for DoRA), so that
  ``jlora.wrap(model.apply)`` computes what the PEFT model computes.

  Honoured: ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``,
  ``rank_pattern``, ``alpha_pattern``, ``target_modules`` (list or regex),
  ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
  ``lora_dropout`` (the nodes' dropout), ``fan_in_fan_out`` (it records a
  torch Conv1D base, (in, out); ``lora_A`` / ``lora_B`` have the same shapes
  and meaning either way, as in PEFT, so it only orients a saved
  ``base_layer.weight``). Each is type-checked against LoraConfig's
  declaration (``r`` and ``rank_pattern`` values positive ints, alphas
  finite numbers, flags JSON booleans, ...): PEFT itself does not check, and
  reads ``"use_rslora": "false"`` as true. A missing field takes
  LoraConfig's default, as PEFT's ``from_pretrained`` does (``r=8``,
  ``lora_alpha=8``). Ignored, as they only matter at init or for
  bookkeeping: ``init_lora_weights``, ``task_type``, LoftQ / EVA / CorDA
  configs and the like. Layers of a scanned kernel with different ranks or
  alphas, or left out by ``layers_to_transform``, are zero-padded to the
  largest rank with each layer's scale folded into ``b``.

  Dtype: every adapter array (``a``, ``b``, ``m``) gets one floating dtype:
  ``dtype`` if given, else the widest floating dtype of the file's LoRA
  tensors by `jnp.promote_types` (fp16 ``lora_A`` with fp32 ``lora_B``
  loads as fp32; fp16 with bf16 as fp32), or float32 if the file has none.
  Integer and bool tensors, which PEFT copies into its float parameters,
  are converted the same way: a LoRA node is never integer. Values are
  converted once, from float64; one that the dtype cannot hold (fp16 beyond
  65504) raises rather than loading as inf, and so does an inf or NaN in
  the file.

  Args:
    directory: holds ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    params: the base params (no LoRA nodes yet), possibly sharded or
      quantized; adapters follow the kernels' shardings as in `jlora.apply`.
    dtype: adapter dtype (floating); default as above.
    layers_key: path segment of a scanned layer stack.

  Returns:
    `params` with each targeted kernel replaced by a `LoRA` node.

  Raises:
    PeftFormatError (a ValueError): a config field jlora cannot honour
      (``peft_type`` other than LORA, ``bias`` other than "none",
      ``modules_to_save``, ``use_qalora``, ``lora_bias``, an unknown
      non-empty field, ...) or of the wrong type; a missing, unexpected or
      duplicate key; a shape that does not fit the base kernel (an adapter
      for another model); an unreadable (truncated) safetensors file; values
      the dtype cannot hold. The message names the field or key.
    FileNotFoundError: no ``adapter_config.json`` or
      ``adapter_model.safetensors`` (for a pickled ``adapter_model.bin`` it
      says how to convert it).

  Example:
    >>> model, params = jlora.models.from_pretrained("Qwen/Qwen2.5-0.5B")
    >>> lp = jlora.peft.load("my-peft-adapter", params)
    >>> logits = jlora.wrap(model.apply)({"params": lp}, ids)
  """
  directory = os.fspath(directory)
  raw = cfg.read(directory)
  config = cfg.check(raw)
  hint = ("" if "r" in raw else f" (adapter_config.json has no r, so it is"
          f" LoraConfig's default, {config['r']})")
  groups = _read_tensors(directory)
  adapter_dtype = _adapter_dtype(groups, dtype)
  existing = [p for p, x in _paths.leaves_with_path(params) if is_lora(x)]
  if existing:
    raise PeftFormatError(
        f"params already hold LoRA nodes at {existing[:3]}; pass the base"
        " params (jlora.merge(params) to fuse an earlier adapter)")
  modules = list(_modules(params, layers_key))
  linear = [m for m in modules if not m.param]
  experts = [m for m in modules if m.param]
  targets = config["target_modules"]
  if targets == "all-linear" or targets == ["all-linear"]:
    # PEFT: every Linear except the output layer.
    heads = {n for m in linear if HEAD_PATTERN.search(m.path) for n in m.names}
    config = {**config, "target_modules": [
        n for m in linear for n in m.names if n not in heads]}
  targeted = {n for m in linear for n in m.names
              if cfg.is_targeted(config, n)}
  wrapped = {n for m in experts for n in m.names
             if cfg.is_parameter_targeted(config, n)}
  # The file names a wrapped parameter by its wrapper module.
  wrapper = _wrappers(experts, wrapped)
  file_names = targeted | set(wrapper.values())
  known = {n for m in linear for n in m.names}
  if not targeted and not wrapped:
    params_hint = (f" and target_parameters={config['target_parameters']!r}"
                   f" matches no stacked expert kernel (parameter keys look"
                   f" like {sorted({n for m in experts for n in m.names})[:2]})"
                   if config["target_parameters"] else "")
    raise PeftFormatError(
        f"target_modules={config['target_modules']!r} matches no linear"
        f" kernel of params{params_hint}; module names look like"
        f" {sorted(known)[:3]}")
  if config["target_parameters"] and not wrapped:
    # PEFT raises the same way when it wraps no parameter.
    raise PeftFormatError(
        f"target_parameters={config['target_parameters']!r} matches no"
        " stacked expert kernel (a 'bio' (experts, in, out) leaf named"
        " 'kernel') of params; parameter keys look like"
        f" {sorted({n for m in experts for n in m.names})[:2]}")
  for name in sorted(set(groups) - file_names):
    key = f"{cfg.KEY_PREFIX}{name}.{next(iter(groups[name]))}"
    why = ("is not targeted by the config's target_modules /"
           " layers_to_transform / exclude_modules" if name in known else
           f"has no linear kernel in params (known modules look like"
           f" {sorted(known)[:3]})")
    raise PeftFormatError(f"unexpected key '{key}': module '{name}' {why}")
  for name in sorted(targeted - set(groups)):
    raise PeftFormatError(
        f"missing key '{cfg.KEY_PREFIX}{name}.{_A}': module '{name}' is"
        " targeted by the config but has no tensors in the file")
  for key, name in sorted(wrapper.items()):
    if name not in groups:
      raise PeftFormatError(
          f"missing key '{cfg.KEY_PREFIX}{name}.{_A}': parameter '{key}' is"
          " targeted by the config's target_parameters but its wrapper has"
          " no tensors in the file")
  replace = {}
  for m in linear:
    if any(n in targeted for n in m.names):
      groups_here = {n: groups[n] for n in m.names if n in targeted}
      replace[m.path] = _build_node(m, groups_here, config,
                                    adapter_dtype, hint)
  for m in experts:
    if any(n in wrapped for n in m.names):
      groups_here = {n: groups[wrapper[n]] for n in m.names if n in wrapped}
      replace[m.path] = _build_node(m, groups_here, config, adapter_dtype,
                                    hint, keys=wrapper)
  return _paths.map_with_path(lambda p, x: replace.get(p, x), params)
