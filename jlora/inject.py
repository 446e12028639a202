"""`apply`: replace targeted kernels of a params tree by `LoRA` nodes."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora.node import (LoRA, base_array, check_layout, default_layout,
                        factor_shapes, is_lora, kernel_matrix)
from jlora.layouts import select_targets
from jlora.targets import (Selector, format_layout_dict, path_regex,
                           pattern_value)


def _adapter_dtype(w_dtype, dtype):
  if dtype is not None:
    return jnp.dtype(dtype)
  if not jnp.issubdtype(w_dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  # Adapters train in at least float32, as PEFT's autocast_adapter_dtype does.
  return jnp.promote_types(w_dtype, jnp.float32)


def check_key(key: Any, name: str = "key") -> Any:
  """Returns `key` unchanged if it is one PRNG key; else a clear error.

  Accepted: a typed key (``jax.random.key(seed)``, shape ()) or a legacy
  raw key (``jax.random.PRNGKey(seed)``, uint32 of shape (2,) for the
  default threefry implementation).
  """
  forms = (f"{name} must be one PRNG key: jax.random.key(seed), or a legacy"
           " jax.random.PRNGKey(seed) (uint32 of shape (2,))")
  dtype = getattr(key, "dtype", None)
  if dtype is None or isinstance(key, (bool, int, float, np.generic)):
    raise TypeError(f"{forms}; got {type(key).__name__} {key!r}")
  if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    try:
      typed = jax.random.wrap_key_data(key)
    except (TypeError, ValueError):
      raise ValueError(
          f"{forms}; got an array of shape {tuple(key.shape)} and dtype"
          f" {dtype}") from None
  else:
    typed = key
  if typed.shape != ():
    raise ValueError(
        f"{forms}; got {typed.shape} keys (shape {tuple(key.shape)}): pass a"
        " single key, or jax.vmap over a batch of them")
  return key


def _as_int(value: Any) -> Any:
  """NumPy/JAX integer scalars as Python ints; other values unchanged."""
  if isinstance(value, (bool, np.bool_)):
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
      and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer)):
    return int(value)
  return value


def _check_alpha(alpha: Any, path: str) -> float:
  """A finite, non-zero real number (negative flips the update's sign)."""
  value = None
  if not isinstance(alpha, (bool, np.bool_, str)):
    try:
      value = float(alpha)  # ints, floats, NumPy and concrete JAX scalars
    except (TypeError, ValueError):
      pass
  if value is None or np.ndim(alpha) != 0 or not math.isfinite(value):
    raise ValueError(
        f"alpha must be a finite number (scale = alpha / rank), got"
        f" {alpha!r} for '{path}'")
  if value == 0:
    raise ValueError(
        f"alpha=0 for '{path}' makes scale = alpha / rank zero: the adapter"
        " would never change the model and its factors would get zero"
        " gradients; use alpha > 0 (default: the rank)")
  return value


def _check_options(*, dropout, dtype, layout, rank_pattern, alpha_pattern,
                   rslora, dora, train_a, init) -> None:
  """Type checks of `apply`'s options, each error naming the option."""
  if (isinstance(dropout, (bool, np.bool_)) or
      not isinstance(dropout, (int, float, np.integer, np.floating)) or
      not 0.0 <= dropout < 1.0):
    raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(
        f"dtype={dtype!r}: adapters must be floating point, e.g."
        " jnp.float32 or jnp.bfloat16 (or None for the default)")
  for name, value in (("rslora", rslora), ("dora", dora),
                      ("train_a", train_a)):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{name} must be True or False, got {value!r}")
  if not isinstance(init, str):
    raise TypeError(f"init must be a string such as 'default' or 'pissa',"
                    f" got {init!r}")
  for name, patterns in (("layout", layout), ("rank_pattern", rank_pattern),
                         ("alpha_pattern", alpha_pattern)):
    if patterns is not None and not isinstance(patterns, dict):
      raise TypeError(
          f"{name} must be a dict {{regex: value}} over paths, got"
          f" {type(patterns).__name__}: {patterns!r}")
  for rx, roles in (layout or {}).items():
    if not isinstance(roles, str):
      raise TypeError(
          f"layout[{rx!r}] must be a string of roles such as 'ioo', got"
          f" {roles!r}")


def _check_patterns_match(chosen: list[str], **patterns) -> None:
  """Every key of rank_pattern/alpha_pattern must select a targeted path."""
  for name, table in patterns.items():
    for rx in table or {}:
      if not any(re.search(rx, p) for p in chosen):
        raise ValueError(
            f"{name} key {rx!r} matches none of the targeted kernels"
            f" {chosen[:6]}; fix the regex or drop the entry")


def _check_rank(rank: Any, path: str, fan_in: int, fan_out: int,
                hint: str = "") -> int:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(
        f"rank must be a positive int, got {rank!r} for '{path}'")
  if rank > min(fan_in, fan_out):
    raise ValueError(
        f"rank {rank} exceeds min(in, out) = {min(fan_in, fan_out)} for"
        f" '{path}' (in={fan_in}, out={fan_out}); use rank <= "
        f"{min(fan_in, fan_out)} or exclude it{hint}")
  return rank


def _layout_hint(path: str, roles: str, shape: tuple[int, ...]) -> str:
  """Why a rank fails on a multi-axis kernel: most likely its layout."""
  if len(shape) <= 2:
    return ""
  example = format_layout_dict({path_regex(path): "..."})
  return (f". '{path}' has {len(shape)} axes {shape}, read with layout"
          f" '{roles}' ('b' stacked, 'i' input, 'o' output): the layout is"
          " the likely cause. Infer it from the model with layout ="
          " jlora.infer_layout(fn, params, *args), or give it, e.g."
          f" layout={example}")


def _adapter_shardings(w: Any, layout: str):
  """Shardings for (a, b) derived from a concrete kernel's NamedSharding.

  `a` takes the spec of the kernel's stacked axes and of its first input
  axis, `b` those of its stacked axes and of its first output axis; the rank
  axis is replicated. XLA propagates the rest.
  """
  sharding = getattr(w, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding) or isinstance(
      w, jax.core.Tracer):
    return None, None
  spec = tuple(sharding.spec) + (None,) * (len(layout) - len(sharding.spec))
  stacked = [s for s, r in zip(spec, layout) if r == "b"]
  first_in = next(s for s, r in zip(spec, layout) if r == "i")
  first_out = next(s for s, r in zip(spec, layout) if r == "o")
  P = jax.sharding.PartitionSpec
  return (jax.sharding.NamedSharding(sharding.mesh, P(*stacked, first_in, None)),
          jax.sharding.NamedSharding(sharding.mesh, P(*stacked, None, first_out)))


def init_adapter(key, w: Any, rank: int, layout: str, dtype=None):
  """Default init: ``a ~ U(-1/sqrt(in), 1/sqrt(in))``, ``b = 0``.

  The bound is PEFT's (kaiming-uniform with a=sqrt(5) on lora_A).
  Shapes: a (*stacked, in, r), b (*stacked, r, out).
  """
  stacked, fan_in, fan_out = factor_shapes(layout, tuple(w.shape))
  dtype = _adapter_dtype(w.dtype, dtype)
  bound = 1.0 / math.sqrt(fan_in)
  a = jax.random.uniform(key, (*stacked, fan_in, rank), dtype, -bound, bound)
  b = jnp.zeros((*stacked, rank, fan_out), dtype)
  a_sharding, b_sharding = _adapter_shardings(w, layout)
  if a_sharding is not None:
    a, b = jax.device_put(a, a_sharding), jax.device_put(b, b_sharding)
  return a, b


def apply(params: Any, rank: int, *, alpha: float | None = None,
          targets: Selector = None, exclude: Selector = None,
          key: jax.Array | None = None, dtype: Any = None,
          layout: dict[str, str] | None = None, rslora: bool = False,
          rank_pattern: dict[str, int] | None = None,
          alpha_pattern: dict[str, float] | None = None,
          init: str = "default", dora: bool = False, train_a: bool = True,
          dropout: float = 0.0) -> Any:
  """Returns `params` with each targeted kernel replaced by a `LoRA` node.

  Args:
    params: any pytree of arrays: a linen params dict, a `FrozenDict`, or an
      `nnx.State` from `nnx.split`.
    rank: adapter rank r, a positive int (Python or NumPy) <= min(in, out)
      of every target.
    alpha: scaling numerator, a finite non-zero number; ``scale = alpha /
      r`` (a negative alpha flips the update's sign). Defaults to ``rank``
      (scale 1).
    targets: regex searched in each '/'-joined path, a list of them, a
      callable ``(path, leaf) -> bool`` or ``"all-linear"`` (the default:
      every float ``kernel`` with ndim >= 2 except an output head; with a
      `Layouts` from `jlora.infer_layout`, every matmul weight it found
      except heads and embeddings, and explicit targets pick among those).
      Only floating-point kernels take adapters: a target that picks an
      integer or bool kernel raises naming it.
    exclude: same forms; removes paths from the targets.
    key: PRNG key for the random init of ``a`` (required): one
      ``jax.random.key(seed)`` or legacy ``jax.random.PRNGKey(seed)``.
    dtype: adapter dtype; default float32 (float64 for a float64 base).
    layout: ``{regex: roles}`` with one letter per kernel axis: 'b' a stacked
      axis (one adapter per index), 'i' an input (contracted) axis, 'o' an
      output axis; a key equal to the path wins, else the first regex found
      in it. Default: leading axes 'b', then 'io', e.g. 'bio' for a
      scanned (layers, in, out) kernel. A DenseGeneral kernel (in, heads,
      head_dim) is 'ioo'; an output projection (heads, head_dim, out) 'iio'.
      ``jlora.infer_layout(fn, params, *args)`` reads them off the model.
    rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
    rank_pattern, alpha_pattern: ``{regex: value}`` overriding rank/alpha for
      matching paths (first match wins); a regex matching no target raises.
    init: ``"default"`` (a uniform, b zero), ``"gaussian"``, ``"pissa"``,
      ``"pissa_niter_N"`` (randomized SVD, N power iterations) or
      ``"olora"``: see `jlora.variants.initialize`.
    dora: add a DoRA magnitude ``m`` initialised to the base's per-output
      column norms (Liu et al., 2024).
    train_a: False freezes ``a`` after init (LoRA-FA, Zhang et al., 2023).
    dropout: dropout rate on the adapter path's input; active only when the
      wrapped call gets ``lora_rng`` (see `jlora.wrap`).

  Returns:
    The same tree, targeted kernels replaced by `LoRA` nodes with ``a`` of
    shape (*stacked, in, r) and ``b`` of shape (*stacked, r, out).

  Examples:
    >>> lp = jlora.apply(params, rank=8, alpha=16.0, targets="q_proj|v_proj",
    ...                  key=jax.random.key(0))
    >>> print(jlora.summary(lp))
  """
  leaves = _paths.leaves_with_path(params)
  if not leaves:
    raise ValueError("params hold no arrays (an empty tree): pass the model's"
                     " params, e.g. model.init(key, x)['params']")
  existing = [p for p, x in leaves if is_lora(x)]
  if existing:
    raise ValueError(
        f"params already hold LoRA adapters at {existing[:5]}; call"
        " jlora.merge(params) first to stack a new adapter on a fused base")
  if key is None:
    raise ValueError("jlora.apply needs a PRNG key for the adapters' random"
                     " init, e.g. key=jax.random.key(0)")
  check_key(key)
  _check_options(dropout=dropout, dtype=dtype, layout=layout,
                 rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                 rslora=rslora, dora=dora, train_a=train_a, init=init)
  # Static node fields hold plain Python values (np.bool_ and np.float32
  # would hash and print differently in metadata).
  dropout, rslora, dora, train_a = (float(dropout), bool(rslora), bool(dora),
                                    bool(train_a))
  chosen = select_targets(leaves, targets, exclude, layout)
  if not chosen:
    raise ValueError(
        f"exclude={exclude!r} removes every kernel that targets={targets!r}"
        " selects, so no adapter would be added; narrow the exclusion")
  _check_patterns_match(chosen, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern)
  keys = dict(zip(chosen, jax.random.split(key, max(len(chosen), 1))))

  def replace(path: str, leaf: Any) -> Any:
    if path not in keys:
      return leaf
    roles = _layout_of(path, leaf, layout)
    check_layout(roles, tuple(leaf.shape), path)
    _, fan_in, fan_out = factor_shapes(roles, tuple(leaf.shape))
    r = _check_rank(_as_int(pattern_value(path, rank_pattern, rank)), path,
                    fan_in, fan_out,
                    _layout_hint(path, roles, tuple(leaf.shape)))
    a_value = pattern_value(path, alpha_pattern, alpha)
    a_value = r if a_value is None else _check_alpha(a_value, path)
    a, b = init_adapter(keys[path], leaf, r, roles, dtype)
    m = magnitude(leaf, roles, a.dtype) if dora else None
    return LoRA(w=leaf, a=a, b=b, m=m,
                alpha=float(a_value),
                layout=roles, rslora=rslora, path=path, dropout=dropout,
                train_a=train_a)

  tree = _paths.map_with_path(replace, params)
  if init != "default":
    from jlora.initializers import initialize  # it builds on init_adapter
    tree = initialize(tree, init, jax.random.fold_in(key, 1))
  return tree


def _layout_of(path: str, leaf: Any, layout: dict[str, str] | None) -> str:
  """The layout keyed by exactly `path`, else the first regex found in it."""
  if layout and path in layout:
    return layout[path]
  return pattern_value(path, layout, None) or default_layout(leaf.ndim)


def magnitude(w: Any, layout: str, dtype) -> jax.Array:
  """DoRA's initial magnitude: the kernel's norm per output, (*stacked, out)."""
  mat = kernel_matrix(base_array(w), layout).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(mat * mat, axis=-2)).astype(dtype)
