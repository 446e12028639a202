"""Adapter initialisations beyond the default: PiSSA, OLoRA, Gaussian.

Each function takes a tree made by `jlora.apply` and re-initialises every
`LoRA` node in it. PiSSA and OLoRA move a rank-r part of the base kernel into
the adapter and keep the rest as the frozen ``w``::

    w_residual = W - scale * a @ b

so the fused model is unchanged at init: ``jlora.merge`` of an untrained
adapter returns ``W`` (to float tolerance), whatever the layout or stacking.
All matrix maths is done on the kernel viewed as (*stacked, in, out) and in
at least float32; the residual is cast back to the base's dtype. A quantized
base is dequantized first and comes back as a plain array (re-quantize the
residual afterwards, as the PiSSA paper advises).

A node's DoRA magnitude ``m`` stays valid (the fused kernel is unchanged); a
node's per-rank gains ``e`` are reset to ones so that ``a @ diag(e) @ b`` is
the principal part.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora.node import LoRA, base_array, is_lora, kernel_matrix


def _as_matrix(w: Any, layout: str) -> jax.Array:
  """The kernel as (*stacked, in, out), in at least float32."""
  w = base_array(w)
  return kernel_matrix(w, layout).astype(jnp.promote_types(w.dtype,
                                                           jnp.float32))


def _with_factors(node: LoRA, a: jax.Array, b: jax.Array,
                  residual: bool) -> LoRA:
  """`node` with new factors; the base replaced by ``W - delta`` if asked."""
  new = dataclasses.replace(
      node, a=a.astype(node.a.dtype), b=b.astype(node.b.dtype),
      e=None if node.e is None else jnp.ones_like(node.e))
  if not residual:
    return new
  w = base_array(node.w)
  acc = jnp.promote_types(w.dtype, jnp.float32)
  # delta() of the new node is laid out like w; the subtraction happens in
  # float32 so that merge (also in float32) gives W back.
  rest = w.astype(acc) - new.delta(acc)
  return dataclasses.replace(new, w=rest.astype(w.dtype))


def _nodes_map(fn, tree: Any) -> Any:
  """Applies ``fn(index, node)`` to each LoRA node in leaf order."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_lora)
  count = iter(range(len(leaves)))
  return jax.tree.unflatten(treedef, [
      fn(next(count), x) if is_lora(x) else x for x in leaves])


def _check_node(node: LoRA, what: str) -> None:
  if node.a is None or node.b is None or node.w is None:
    raise ValueError(
        f"{what} needs whole LoRA nodes but '{node.path}' is one half of a"
        " partition; call it on jlora.combine(trainable, frozen)")


def randomized_svd(key: jax.Array, x: jax.Array, rank: int, n_iter: int,
                   oversample: int = 0):
  """Top-`rank` SVD of a batch of matrices by randomized subspace iteration.

  Halko, Martinsson & Tropp's range finder: ``Y = X @ G`` with Gaussian
  ``G`` of ``rank + oversample`` columns, `n_iter` power iterations
  re-orthonormalised by QR, then an exact SVD of the small ``Q^T X``.
  ``torch.svd_lowrank`` (PEFT's ``pissa_niter_N``) is the same with
  ``oversample=0``.

  Args:
    key: PRNG key for the sketch.
    x: (*batch, m, n) matrices.
    rank: number of singular triplets returned.
    n_iter: power iterations (more = closer to the exact SVD).
    oversample: extra sketch columns, clipped to min(m, n).

  Returns:
    ``(u, s, vt)`` of shapes (*batch, m, rank), (*batch, rank),
    (*batch, rank, n).

  References:
    Halko et al., "Finding structure with randomness", SIAM Review 2011.
  """
  m, n = x.shape[-2:]
  cols = min(rank + oversample, m, n)
  g = jax.random.normal(key, (*x.shape[:-2], n, cols), x.dtype)
  q, _ = jnp.linalg.qr(x @ g)
  xt = jnp.swapaxes(x, -1, -2)
  for _ in range(n_iter):
    z, _ = jnp.linalg.qr(xt @ q)
    q, _ = jnp.linalg.qr(x @ z)
  u_small, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ x,
                                  full_matrices=False)
  u = q @ u_small
  return u[..., :rank], s[..., :rank], vt[..., :rank, :]


def pissa(tree: Any, *, n_iter: int | None = None,
          key: jax.Array | None = None, oversample: int = 0) -> Any:
  """PiSSA: adapters start at the principal singular part of each kernel.

  With the kernel as (*stacked, in, out) ``W = U S V^T`` and ``s = scale``::

      a = U_r sqrt(S_r / s)        # (*stacked, in, r)
      b = sqrt(S_r / s) V_r^T      # (*stacked, r, out)
      w = W - s * a @ b            # the frozen residual

  so ``s * a @ b = U_r S_r V_r^T`` and ``merge`` returns ``W``.

  Args:
    tree: a tree from `jlora.apply`; every LoRA node is re-initialised.
    n_iter: ``None`` for the exact SVD; an int for the fast randomized SVD
      with that many power iterations (PEFT's ``"pissa_niter_N"``).
    key: PRNG key for the randomized SVD (required when `n_iter` is set).
    oversample: extra sketch columns of the randomized SVD (PEFT uses 0).

  Returns:
    The tree with new ``a``, ``b`` and residual ``w`` in every node.

  Examples:
    >>> lp = jlora.apply(params, rank=8, key=key)
    >>> lp = jlora.variants.pissa(lp)                     # exact SVD
    >>> lp = jlora.variants.pissa(lp, n_iter=4, key=key)  # fast

  References:
    Meng et al., "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation of Large Language Models", 2024.
  """
  if n_iter is not None and key is None:
    raise ValueError("pissa with n_iter (randomized SVD) needs a PRNG key,"
                     " e.g. key=jax.random.key(0); or pass n_iter=None for"
                     " the exact SVD")

  def init(index: int, node: LoRA) -> LoRA:
    _check_node(node, "pissa")
    x, r = _as_matrix(node.w, node.layout), node.rank
    if n_iter is None:
      u, s, vt = jnp.linalg.svd(x, full_matrices=False)
      u, s, vt = u[..., :r], s[..., :r], vt[..., :r, :]
    else:
      u, s, vt = randomized_svd(jax.random.fold_in(key, index), x, r,
                                n_iter, oversample)
    root = jnp.sqrt(s / node.scale)
    return _with_factors(node, u * root[..., None, :], root[..., :, None] * vt,
                         residual=True)

  return _nodes_map(init, tree)


def olora(tree: Any) -> Any:
  """OLoRA: adapters start at the first r columns of a QR factorisation.

  As PEFT's ``init_lora_weights="olora"``: with PyTorch's (out, in) weight
  ``W^T = Q R`` (``Q`` orthonormal (out, k), ``R`` upper triangular (k, in)),
  ``lora_B = Q[:, :r]`` and ``lora_A = R[:r]``; in jlora's (in, out) layout::

      a = R[:r]^T      # (*stacked, in, r)
      b = Q[:, :r]^T   # (*stacked, r, out), orthonormal rows
      w = W - scale * a @ b

  Note that, like PEFT, the factors are not divided by ``scale``.

  Examples:
    >>> lp = jlora.variants.olora(jlora.apply(params, rank=8, key=key))

  References:
    Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
    Models", 2024.
  """

  def init(index: int, node: LoRA) -> LoRA:
    del index
    _check_node(node, "olora")
    r = node.rank
    q, rr = jnp.linalg.qr(jnp.swapaxes(_as_matrix(node.w, node.layout), -1, -2))
    return _with_factors(node, jnp.swapaxes(rr[..., :r, :], -1, -2),
                         jnp.swapaxes(q[..., :, :r], -1, -2), residual=True)

  return _nodes_map(init, tree)


def gaussian(tree: Any, key: jax.Array) -> Any:
  """``a ~ N(0, 1/r^2)``, ``b = 0``: PEFT's ``init_lora_weights="gaussian"``.

  The base is untouched and ``merge`` returns it bit for bit.

  Examples:
    >>> lp = jlora.variants.gaussian(lp, jax.random.key(1))
  """

  def init(index: int, node: LoRA) -> LoRA:
    _check_node(node, "gaussian")
    r = node.rank
    a = jax.random.normal(jax.random.fold_in(key, index), node.a.shape,
                          node.a.dtype) / r
    return _with_factors(node, a, jnp.zeros_like(node.b), residual=False)

  return _nodes_map(init, tree)


_NITER = re.compile(r"^pissa_niter_(\d+)$")


def initialize(tree: Any, method: str, key: jax.Array | None = None) -> Any:
  """Re-initialises a LoRA tree by PEFT's ``init_lora_weights`` name.

  Args:
    tree: a tree from `jlora.apply`.
    method: ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"gaussian"``
      or ``"default"`` (leave as is).
    key: PRNG key (``pissa_niter_N`` and ``gaussian`` need it).

  Examples:
    >>> lp = jlora.variants.initialize(lp, "pissa_niter_4", key)
  """
  if method in ("default", "lora", True):
    return tree
  if method == "pissa":
    return pissa(tree)
  if (match := _NITER.match(str(method))):
    return pissa(tree, n_iter=int(match.group(1)), key=key)
  if method == "olora":
    return olora(tree)
  if method == "gaussian":
    if key is None:
      raise ValueError("initialize(..., 'gaussian') needs a PRNG key")
    return gaussian(tree, key)
  raise ValueError(
      f"unknown init method {method!r}; use 'pissa', 'pissa_niter_N' (e.g."
      " 'pissa_niter_4'), 'olora', 'gaussian' or 'default'")

