"""Model merging of adapters: task arithmetic, TIES, DARE, SVD, concatenation.

`combine_adapters` makes one adapter out of several on the same base, with
the semantics of PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21):

- ``"cat"``: exact. ``a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]`` along the rank
  axis, ``b`` stacked to match; rank = sum of ranks, so
  ``delta = sum_i w_i delta_i``.
- ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
  ``"magnitude_prune"``: the factors are merged separately, ``a`` with
  weights ``sign(w_i s_i) sqrt(|w_i s_i|)`` and ``b`` with
  ``sqrt(|w_i s_i|)`` (``s_i`` the adapter's scale). Cheap, rank unchanged
  (all ranks must agree), but only an approximation of the weighted sum of
  updates: cross terms ``a_i b_j`` appear.
- ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
  ``"magnitude_prune_svd"``: the full updates ``delta_i = s_i a_i b_i`` are
  merged, then truncated to `rank` by SVD; ``b`` carries the singular
  values.

How tensors ``t_i`` (factors or updates) are merged with weights ``w_i``:

- task arithmetic (linear, svd, cat): ``sum_i w_i t_i``.
- magnitude prune: keep the ``int(density * size)`` largest ``|t_i|`` of
  each tensor, zero the rest, then task arithmetic.
- TIES: magnitude prune; elect a sign per entry, ``sign(sum_i t_i)``
  (``"total"``) or ``sign(sum_i sign(t_i))`` (``"frequency"``), 0 counting
  as +; average the weighted entries that agree with it.
- DARE: keep each entry with probability `density` and divide by
  `density`, then task arithmetic (``dare_linear``) or TIES' sign election
  and average (``dare_ties``). Random: needs `key`.

The result is an ordinary LoRA tree with ``alpha = rank`` (scale 1), so
`jlora.merge`, `jlora.wrap`, `jlora.save_adapter` and
`jlora.peft.save` all apply, and `jlora.add_adapter` can add it to a set.
Each stacked slice (e.g. one layer of a scanned kernel) is pruned and
decomposed on its own, as PEFT does per module.

Where jlora departs from PEFT 0.21, on purpose:

- rsLoRA inputs: PEFT gives the combined adapter ``lora_alpha = r`` but
  keeps ``use_rslora`` of the first adapter, so its update comes out
  multiplied by ``sqrt(r)``; jlora's result has scale 1 (no rsLoRA).
- Per-target ranks (``rank_pattern``): PEFT allocates the sum (``cat``) or
  the largest configured rank everywhere and zero-pads; jlora gives each
  target exactly the rank it needs. The updates are the same.
- ``svd_clamp`` depends on the signs of singular-vector pairs, which differ
  between SVD implementations (LAPACK in PyTorch and in XLA choose
  differently), so clamped factors can differ from PEFT's; unclamped SVD
  updates agree.
- DARE draws its masks from the given JAX `key`, not PyTorch's global RNG.

References:
  Ilharco et al., "Editing Models with Task Arithmetic", 2023.
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
  2023.
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch" (DARE), 2024.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp

from jlora import _paths
from jlora.adapters import AdapterSet, _strip, add_adapter, is_adapter_set
from jlora.node import LoRA, factor_shapes

__all__ = ["METHODS", "combine_adapters"]

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties",
                  "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
               "magnitude_prune_svd")
METHODS = ("cat",) + FACTOR_METHODS + SVD_METHODS

SignMethod = Literal["total", "frequency"]


# ------------------------------------------------------- merging tensors
# Task tensors arrive stacked as (k, S, n): k adapters, S stacked slices,
# n entries per slice; pruning is per (adapter, slice).


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
  """Keeps the ``int(density * n)`` largest |entries| of each row."""
  if density >= 1:
    return t
  k = int(density * t.shape[-1])
  if k == 0:
    return jnp.zeros_like(t)
  _, idx = jax.lax.top_k(jnp.abs(t), k)
  keep = jnp.put_along_axis(jnp.zeros(t.shape, bool), idx, True, axis=-1,
                            inplace=False)
  return jnp.where(keep, t, jnp.zeros_like(t))


def _random_prune(t: jax.Array, density: float, key: jax.Array) -> jax.Array:
  """Keeps each entry with probability `density`, rescaled by 1/density."""
  if density >= 1:
    return t
  keep = jax.random.bernoulli(key, density, t.shape)
  return jnp.where(keep, t, jnp.zeros_like(t)) / jnp.asarray(density, t.dtype)


def _elect(t: jax.Array, method: SignMethod) -> jax.Array:
  """Bool mask of entries whose sign agrees with the elected (majority) one."""
  sign = jnp.sign(t)
  if method == "total":
    votes = t.sum(axis=0)
  elif method == "frequency":
    votes = sign.sum(axis=0)
  else:
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency',"
                     f" got {method!r}")
  majority = jnp.where(votes >= 0, 1, -1).astype(t.dtype)
  return sign == majority


def _weighted(t: jax.Array, w: jax.Array) -> jax.Array:
  return t * w.reshape(w.shape + (1,) * (t.ndim - 1)).astype(t.dtype)


def _merge(kind: str, t: jax.Array, w: jax.Array, density: float | None,
           sign_method: SignMethod, key: jax.Array | None) -> jax.Array:
  """Merges stacked task tensors ``t`` (k, S, n) with weights ``w`` (k,)."""
  if kind == "linear":
    return _weighted(t, w).sum(axis=0)
  if kind in ("magnitude_prune", "ties"):
    t = _magnitude_prune(t, density)
  elif kind in ("dare_linear", "dare_ties"):
    keys = jax.random.split(key, t.shape[0])
    t = jnp.stack([_random_prune(t[i], density, keys[i])
                   for i in range(t.shape[0])])
  if kind in ("magnitude_prune", "dare_linear"):
    return _weighted(t, w).sum(axis=0)
  agree = _elect(t, sign_method)
  total = jnp.where(agree, _weighted(t, w), 0).sum(axis=0)
  return total / jnp.maximum(agree.sum(axis=0), 1).astype(t.dtype)


# --------------------------------------------------------------- per node


def _folded(a: jax.Array, b: jax.Array, e: jax.Array | None, acc
            ) -> tuple[jax.Array, jax.Array]:
  """(a, b) as (S, in, r), (S, r, out) in `acc`, AdaLoRA gains folded in b."""
  if e is not None:
    b = e[..., :, None] * b
  s = math.prod(a.shape[:-2])
  return (a.astype(acc).reshape(s, *a.shape[-2:]),
          b.astype(acc).reshape(s, *b.shape[-2:]))


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None,
                 full_matrices: bool) -> tuple[jax.Array, jax.Array]:
  """Rank-`rank` factors of delta (S, in, out): a = U, b = diag(s) V^T."""
  u, s, vh = jnp.linalg.svd(delta, full_matrices=full_matrices)
  a = u[..., :, :rank]
  b = s[..., :rank, None] * vh[..., :rank, :]
  if clamp is not None:
    dist = jnp.concatenate([b.reshape(b.shape[0], -1),
                            a.reshape(a.shape[0], -1)], axis=-1)
    hi = jnp.quantile(dist, clamp, axis=-1)[:, None, None]
    a = jnp.clip(a, -hi, hi)
    b = jnp.clip(b, -hi, hi)
  return a, b


# One compiled program per (method, shapes): eager calls would otherwise
# compile every primitive on its own.
@functools.partial(jax.jit, static_argnames=(
    "method", "scales", "rank", "density", "sign_method", "clamp",
    "full_matrices"))
def _factors(a_s, b_s, e_s, weights, key, *, method, scales, rank, density,
             sign_method, clamp, full_matrices):
  """Combined (a, b), shaped (S, in, r'), (S, r', out), in float32 or wider."""
  acc = jnp.promote_types(a_s[0].dtype, jnp.float32)
  factors = [_folded(a, b, e, acc) for a, b, e in zip(a_s, b_s, e_s)]
  weights = weights.astype(acc)
  ws = weights * jnp.asarray(scales, acc)
  if method == "cat":
    a = jnp.concatenate([f[0] * ws[i] for i, f in enumerate(factors)], -1)
    b = jnp.concatenate([f[1] for f in factors], -2)
    return a, b
  if method in FACTOR_METHODS:
    root = jnp.sqrt(jnp.abs(ws))
    key_a, key_b = (None, None) if key is None else jax.random.split(key)
    a = _merge(method, jnp.stack([f[0].reshape(f[0].shape[0], -1)
                                  for f in factors]),
               jnp.where(ws >= 0, root, -root), density, sign_method, key_a)
    b = _merge(method, jnp.stack([f[1].reshape(f[1].shape[0], -1)
                                  for f in factors]),
               root, density, sign_method, key_b)
    return a.reshape(factors[0][0].shape), b.reshape(factors[0][1].shape)
  deltas = jnp.stack([
      jnp.einsum("sir,sro->sio", fa, fb,
                 precision=jax.lax.Precision.HIGHEST) * scale
      for (fa, fb), scale in zip(factors, scales)])
  k, s, fan_in, fan_out = deltas.shape
  kind = "linear" if method == "svd" else method.removesuffix("_svd")
  delta = _merge(kind, deltas.reshape(k, s, -1), weights, density,
                 sign_method, key).reshape(s, fan_in, fan_out)
  return _svd_factors(delta, min(rank, fan_in, fan_out), clamp, full_matrices)


def _combine_node(path: str, kernel: Any, members, method: str, rank, density,
                  sign_method, key, clamp, full_matrices) -> LoRA:
  """members: [(weight, node)] of the adapters that adapt this kernel."""
  nodes = [n for _, n in members]
  first = nodes[0]
  for n in nodes:
    if n.m is not None:
      raise ValueError(
          f"'{path}' has a DoRA magnitude; a weighted combination of DoRA"
          " adapters is not defined (PEFT has none either): jlora.merge them"
          " into the base instead")
    if n.layout != first.layout:
      raise ValueError(
          f"adapters at '{path}' disagree on the layout ({first.layout!r} vs"
          f" {n.layout!r}); they were made with different layout= options")
  if method in FACTOR_METHODS:
    ranks = sorted({n.rank for n in nodes})
    if len(ranks) > 1:
      raise ValueError(
          f"method '{method}' needs adapters of one rank, but '{path}' has"
          f" ranks {ranks}; use method='cat' or an SVD method, or"
          " jlora.truncate the adapters to one rank")
  weights = jnp.stack([jnp.asarray(w, jnp.float32) for w, _ in members])
  a, b = _factors(
      [n.a for n in nodes], [n.b for n in nodes], [n.e for n in nodes],
      weights, key, method=method, scales=tuple(float(n.scale) for n in nodes),
      rank=rank, density=density, sign_method=sign_method, clamp=clamp,
      full_matrices=full_matrices)
  stacked = first.a.shape[:-2]
  _, fan_in, fan_out = factor_shapes(first.layout, tuple(kernel.shape))
  r = a.shape[-1]
  dtype = first.a.dtype
  return LoRA(w=kernel, a=a.reshape(*stacked, fan_in, r).astype(dtype),
              b=b.reshape(*stacked, r, fan_out).astype(dtype),
              alpha=float(r), layout=first.layout, rslora=False, path=path,
              dropout=first.dropout)


# ------------------------------------------------------------------ public


def _as_set(adapters: AdapterSet | Mapping[str, Any]) -> AdapterSet:
  if is_adapter_set(adapters):
    return adapters
  if not isinstance(adapters, Mapping) or not adapters:
    raise TypeError("combine_adapters takes an AdapterSet or a non-empty"
                    " {name: LoRA tree} dict")
  names = list(adapters)
  s = AdapterSet(_strip(adapters[names[0]]), {}, None)
  for name in names:
    s = add_adapter(s, name, adapters[name])
  return s


def combine_adapters(adapters: AdapterSet | Mapping[str, Any],
                     weights: Mapping[str, Any], method: str = "svd", *,
                     density: float | None = None,
                     majority_sign_method: SignMethod = "total",
                     rank: int | None = None, key: jax.Array | None = None,
                     svd_clamp: float | None = None,
                     svd_full_matrices: bool = True) -> Any:
  """One adapter from a weighted combination of several, as PEFT does it.

  Semantics of PEFT's ``add_weighted_adapter`` (see the module docstring
  for each method's maths): for the deterministic methods the update
  ``scale * a @ b`` of every target equals PEFT's ``get_delta_weight`` of
  the combined adapter (transposed to (in, out)) to float32 precision. The
  result is a LoRA tree with ``alpha = rank`` (scale 1) on the same base;
  kernels that no chosen adapter adapts stay plain. Works under `jit`
  (weights may be traced; `method`, `density`, `rank` are static).

  Args:
    adapters: an `AdapterSet`, or ``{name: LoRA tree}`` made on one base
      (the first tree's kernels become the result's base).
    weights: ``{name: weight}``, which adapters to combine and how much
      (negative weights subtract); the order sets the rank order for
      ``"cat"``. With a single adapter, ``"linear"`` is used (as PEFT).
    method: one of `METHODS`; ``"svd"`` by default, as in PEFT.
    density: fraction of entries kept, in [0, 1], for the ``ties``,
      ``dare`` and ``magnitude_prune`` methods (>= 1 keeps all).
    majority_sign_method: ``"total"`` or ``"frequency"`` (TIES' sign
      election).
    rank: output rank of the SVD methods; default the largest rank of the
      combined adapters (over all targets, as PEFT), capped at min(in, out).
    key: PRNG key for the DARE methods (required there); the same key gives
      the same result.
    svd_clamp: quantile q in (0, 1]: the SVD factors are clipped to
      ``[-h, h]``, h the q-quantile of their entries (both factors pooled).
    svd_full_matrices: passed to the SVD (the truncated result is the same).

  Returns:
    A LoRA tree on the adapters' base.

  Examples:
    >>> mix = jlora.combine_adapters(s, {"sql": 1.0, "chat": 0.5}, "ties",
    ...                              density=0.5)
    >>> s = jlora.add_adapter(s, "mix", mix)

  References:
    Yadav et al., "TIES-Merging", 2023; Yu et al., "DARE", 2024.
  """
  s = _as_set(adapters)
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  names = list(weights)
  if not names:
    raise ValueError("weights is empty; give {name: weight} for at least one"
                     " adapter")
  halves = {}
  for name in names:
    if name not in s.adapters:
      raise KeyError(f"no adapter '{name}' to combine; the set holds"
                     f" {list(s.names)}")
    halves[name] = dict((p, x) for p, x in _paths.leaves_with_path(
        s.adapters[name]))
  if len(names) == 1:
    method = "linear"
  pruning = any(t in method for t in ("ties", "dare", "magnitude"))
  if pruning:
    if density is None:
      raise ValueError(f"method '{method}' prunes entries: pass density, the"
                       " fraction kept, e.g. density=0.5")
    if density < 0:
      raise ValueError(f"density should be >= 0, got {density}")
  if "dare" in method and key is None:
    raise ValueError(f"method '{method}' drops entries at random: pass a PRNG"
                     " key, e.g. key=jax.random.key(0)")
  if svd_clamp is not None and not 0 < svd_clamp <= 1:
    raise ValueError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp}")
  kernels = dict(_paths.leaves_with_path(s.base))
  targets = [p for p in kernels if any(p in h for h in halves.values())]
  if method in SVD_METHODS:
    if rank is None:
      rank = max(n.rank for h in halves.values() for n in h.values())
    else:
      for p in targets:
        _, fan_in, fan_out = factor_shapes(_first_node(halves, p).layout,
                                           tuple(kernels[p].shape))
        if rank > min(fan_in, fan_out):
          raise ValueError(
              f"rank {rank} exceeds min(in, out) = {min(fan_in, fan_out)}"
              f" for '{p}'; use rank <= {min(fan_in, fan_out)}")
  combined = {}
  for i, p in enumerate(targets):
    members = [(weights[n], halves[n][p]) for n in names if p in halves[n]]
    node_key = None if key is None else jax.random.fold_in(key, i)
    combined[p] = _combine_node(p, kernels[p], members, method, rank, density,
                                majority_sign_method, node_key, svd_clamp,
                                svd_full_matrices)
  return _paths.map_with_path(lambda p, x: combined.get(p, x), s.base)


def _first_node(halves: dict, path: str) -> LoRA:
  return next(h[path] for h in halves.values() if path in h)
