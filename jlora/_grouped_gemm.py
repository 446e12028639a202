"""Grouped GEMM over rows sorted by group, for the factored expert products.

``ragged_dot(x, w, sizes)``: x (M, K) rows sorted by group, w (G, K, N),
sizes (G,) int32 -> (M, N), row i meeting the kernel of its group. It equals
``lax.ragged_dot``; on Hopper GPUs it runs the grouped GEMM kernels that jax
ships (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` forward and input
gradient, `transposed_ragged_dot_mgpu` weight gradient) under a custom VJP.

Why: XLA's GPU lowering of ``ragged_dot`` (measured on jax 0.11.2) expands
every group to a dense product, G times the FLOPs and the memory (128 experts:
~6 TFLOP/s on an H200 at Qwen3-30B-A3B's expert shapes, against ~240 for the
kernels). `jlora.wrap` routes an expert kernel's base product and both LoRA
factors through here, so a LoRA step on an MoE model never pays that.

Elsewhere (CPU, TPU, other GPUs, float32, shapes the kernels don't take) it
is ``lax.ragged_dot``. ``JLORA_GROUPED_GEMM=xla`` forces that everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The kernels tile K and N by 64 (128-byte bf16 rows for the TMA swizzle);
# other sizes are zero-padded to it, which changes no result. Their output
# stores tile M by 8 rows (an M of 20 fails to lower), so M is padded to 8.
_ALIGN = 64
_ROW_ALIGN = 8
_DTYPES = (jnp.bfloat16, jnp.float16)
# Set while jlora traces a model (`wrap`, `infer_layout`): the jaxpr they
# read must hold the model's `ragged_dot`, which `wrap` then runs factored.
_TRACING = contextvars.ContextVar("jlora_tracing_ragged_dot", default=False)


@contextlib.contextmanager
def as_lax_ragged_dot():
  """Inside: `ragged_dot` is `lax.ragged_dot` (for jlora's own traces)."""
  token = _TRACING.set(True)
  try:
    yield
  finally:
    _TRACING.reset(token)


class Kernels(NamedTuple):
  """The three grouped products a custom-VJP ragged_dot needs.

  forward(x (M, K), w (G, K, N), sizes) -> (M, N)
  input_grad(dy (M, N), w (G, K, N), sizes) -> (M, K)     dy @ w[g].T
  weight_grad(x (M, K), dy (M, N), sizes) -> (G, K, N)    x[g].T @ dy[g]
  K and N are multiples of 64; the outputs are in x's dtype.
  """
  forward: callable
  input_grad: callable
  weight_grad: callable


def _blocks(n: int) -> int:
  return 128 if n % 128 == 0 else 64


@functools.cache
def _mosaic_kernels() -> Kernels:
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as fwd_mod
  from jax.experimental.pallas.ops.gpu import (
    transposed_ragged_dot_mgpu as wgrad_mod)

  # The best of a small sweep on an H200 at Qwen3-30B-A3B's expert shapes
  # (benchmarks/RESULTS.md): 128 x 128 x 64 tiles, 4 stages in flight.
  def forward(x, w, sizes, transpose_rhs=False):
    n = w.shape[1] if transpose_rhs else w.shape[2]
    return fwd_mod.ragged_dot(
      x, w, group_sizes=sizes, block_m=128, block_n=_blocks(n), block_k=64,
      max_concurrent_steps=4, grid_block_n=1, transpose_rhs=transpose_rhs)

  def input_grad(dy, w, sizes):
    return forward(dy, w, sizes, transpose_rhs=True)

  def weight_grad(x, dy, sizes):
    return wgrad_mod.transposed_ragged_dot(
      x, dy, group_sizes=sizes, block_m=_blocks(x.shape[1]),
      block_n=_blocks(dy.shape[1]), block_k=64, max_concurrent_steps=4,
      grid_block_n=1)

  # A computation placed on the CPU of a GPU machine lowers the lax branch.
  fallback = lax_kernels()
  return Kernels(*(
    functools.partial(_on_cuda, cuda, default)
    for cuda, default in zip((forward, input_grad, weight_grad), fallback)))


def _on_cuda(cuda, default, *args):
  return jax.lax.platform_dependent(*args, cuda=cuda, default=default)


def lax_kernels() -> Kernels:
  """The three products as `lax.ragged_dot_general` (any platform)."""
  def weight_grad(x, dy, sizes):
    dims = jax.lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), [0],
                                             [])
    return jax.lax.ragged_dot_general(x, dy, sizes, dims)

  return Kernels(
    lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes),
    lambda dy, w, sizes: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes),
    weight_grad)


@functools.cache
def _hopper() -> bool:
  if os.environ.get("JLORA_GROUPED_GEMM", "") == "xla":
    return False
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return False
  return (device.platform == "gpu"
          and getattr(device, "compute_capability", "") == "9.0")


def default_kernels(x, w, preferred_element_type=None) -> Kernels | None:
  """The Mosaic GPU kernels where they apply to this product, else None."""
  out = preferred_element_type
  if (x.ndim != 2 or w.ndim != 3 or x.dtype != w.dtype
      or not any(x.dtype == d for d in _DTYPES)
      or (out is not None and jnp.dtype(out) != x.dtype)
      or not _hopper()):
    return None
  return _mosaic_kernels()


def ragged_dot(x, w, group_sizes, *, precision=None,
               preferred_element_type=None, kernels: Kernels | None = None):
  """``lax.ragged_dot(x, w, group_sizes)`` as a grouped GEMM where possible.

  Args:
    x: (M, K), rows sorted by group.
    w: (G, K, N).
    group_sizes: (G,) int32, rows per group; rows past their sum give 0.
    precision, preferred_element_type: as in `lax.ragged_dot`.
    kernels: the grouped products to use (default: Hopper's where they
      apply, else `lax.ragged_dot`).

  Returns:
    (M, N).

  Example::

    y = ragged_dot(rows, w, sizes)   # rows (M, K), w (G, K, N) -> (M, N)
    jax.grad(lambda w: ragged_dot(rows, w, sizes).sum())(w)
  """
  if kernels is None and not _TRACING.get():
    kernels = default_kernels(x, w, preferred_element_type)
  if kernels is None:
    return jax.lax.ragged_dot(x, w, group_sizes, precision=precision,
                              preferred_element_type=preferred_element_type)
  (m, k), n = x.shape, w.shape[2]
  pm, pk, pn = -m % _ROW_ALIGN, -k % _ALIGN, -n % _ALIGN
  if pm or pk:
    x = jnp.pad(x, ((0, pm), (0, pk)))
  if pk or pn:
    w = jnp.pad(w, ((0, 0), (0, pk), (0, pn)))
  y = _grouped(x, w, group_sizes.astype(jnp.int32), kernels)
  # Rows past the groups are 0 in lax.ragged_dot; the kernels leave them.
  valid = jnp.arange(m) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], y[:m, :n], jnp.zeros((), y.dtype))


def is_plain(params: dict, lhs_ndim: int, rhs_ndim: int) -> bool:
  """Whether a ragged_dot_general (its params) is ``ragged_dot(x (M, K),
  w (G, K, N), sizes)``: no batch axes, no group offset."""
  dimension_numbers = params["ragged_dot_dimension_numbers"]
  (lc, rc), (lb, rb) = dimension_numbers.dot_dimension_numbers
  return (lhs_ndim == 2 and rhs_ndim == 3
          and params.get("group_offset") is None
          and tuple(dimension_numbers.lhs_ragged_dimensions) == (0,)
          and tuple(dimension_numbers.rhs_group_dimensions) == (0,)
          and tuple(lc) == tuple(rc) == (1,) and not lb and not rb)


def bind_ragged_dot(eqn, invals):
  """A traced `ragged_dot_general` equation, as a grouped GEMM if plain."""
  lhs, rhs, sizes = invals
  p = eqn.params
  if not is_plain(p, lhs.ndim, rhs.ndim):
    return None
  return [ragged_dot(lhs, rhs, sizes, precision=p.get("precision"),
                     preferred_element_type=p.get("preferred_element_type"))]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, sizes, kernels):
  return kernels.forward(x, w, sizes)


def _grouped_fwd(x, w, sizes, kernels):
  # symbolic_zeros: only what is differentiated gets a gradient, so a frozen
  # base kernel costs no (G, K, N) weight-gradient product.
  y = kernels.forward(x.value, w.value, sizes.value)
  return y, (x.value if w.perturbed else None,
             w.value if x.perturbed else None, sizes.value)


def _grouped_bwd(kernels, res, dy):
  x, w, sizes = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  # dy is already 0 past the groups (`ragged_dot` masks its output there),
  # and the weight gradient reads only rows inside them; the input gradient's
  # rows past the groups are left unwritten by the kernels, so they are set
  # to 0 here.
  dx = None
  if w is not None:
    dx = kernels.input_grad(dy.astype(w.dtype), w, sizes)
    valid = (jnp.arange(dx.shape[0]) < jnp.sum(sizes))[:, None]
    dx = jnp.where(valid, dx, jnp.zeros((), dx.dtype))
  dw = None if x is None else kernels.weight_grad(x, dy.astype(x.dtype),
                                                  sizes)
  return dx, dw, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd, symbolic_zeros=True)
