"""An FP8 kernel without an adapter, as `jlora.wrap`'s interpreter sees it.

A kernel quantized to FP8 but left without a LoRA adapter is still frozen
and still multiplied in FP8: `jlora.wrap` hands it to the interpreter as an
`Fp8Kernel`, which follows the same rules as a `Factored` LoRA kernel of
rank 0. Layout ops (transpose, cast, reshape) keep the FP8 form, a scan over
its stacked axis slices the stored arrays, matrix products go through
`jlora._fp8.dot_general`, and any other use sees the dequantized kernel.
"""

from __future__ import annotations

import jax

from jlora import _fp8
from jlora._factored import Factored


@jax.tree_util.register_pytree_node_class
class Fp8Kernel(Factored):
  """A frozen `Fp8Array` in the interpreter: ``x @ w`` with no adapter."""

  group_scales = ()  # one frozen kernel for every example (the rules ask)

  def __init__(self, w: _fp8.Fp8Array):
    self.w = w

  def tree_flatten(self):
    return (self.w,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)

  @property
  def roles(self) -> str:
    """'b' on axes with a scale per index (a scan may slice them), 'i' on
    axes sharing one scale (a product may contract them in FP8)."""
    return "".join("i" if s == 1 and n != 1 else "b"
                   for n, s in zip(self.w.shape, self.w.scale.shape))

  @staticmethod
  def _wrap(w):
    return Fp8Kernel(w) if _fp8.is_fp8(w) else w

  def replace(self, w=None, **kw):
    if kw:
      raise TypeError(f"an FP8 kernel without an adapter has no {sorted(kw)}")
    return self._wrap(self.w if w is None else w)

  def transpose(self, perm):
    return Fp8Kernel(self.w.transpose(perm))

  def astype(self, dtype):
    return self._wrap(self.w.astype(dtype))

  def reshape(self, new_shape):
    return self._wrap(self.w.reshape(tuple(int(s) for s in new_shape)))

  def scanned(self):
    return (self.w,)

  def slice_leading(self, w):
    return Fp8Kernel(w)

  def materialize(self):
    return self.w.dequantize()

  def shares_input_product(self, x, kernel_is_rhs, params):
    return None  # no adapter input to share

  def ragged_dot(self, x, group_sizes, dimension_numbers, params: dict,
                 bind, example_rows=None):
    # XLA has no FP8 grouped GEMM: dequantize per use (recomputed, not
    # saved for the backward pass), as for any product without an FP8 form.
    return _fp8.upcast_product(x, self.w, True, bind)

  def dot_general(self, x, kernel_is_rhs: bool, params: dict, bind, t=None):
    return _fp8.dot_general(x, self.w, kernel_is_rhs, params, bind)
