"""What the stored frozen kernels (NF4/FP4/int8 and FP8) have in common.

`StoredKernel` gives `QuantizedArray` and `Fp8Array` their array-like
metadata (``ndim``, ``size``), eager `dequantize` through one compiled
program per kernel kind and dtype, `astype` that keeps the stored form, and
the argument parsing of `reshape` / `transpose` (a tuple or varargs, -1).
A subclass defines ``shape``, ``dtype``, ``_dequantize(dtype)`` (traceable)
and ``_leaf``, the field whose being a tracer means "inside a transform".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def floating_dtype(dtype: Any, what: str) -> np.dtype:
  """``dtype`` as a NumPy dtype, or a ValueError if it is not floating."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{what} must be a floating dtype, got {dtype!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{what} must be a floating dtype (bfloat16, float16, float32),"
        f" got {dtype.name}: a kernel dequantizes to real values, which an"
        " integer or bool dtype would truncate")
  return dtype


class StoredKernel:
  """Mixin of the stored frozen kernels; see the module docstring."""

  _leaf: str

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def dequantize(self, dtype=None) -> Array:
    """The kernel's values in ``dtype`` (default: its compute dtype).

    Computed in float32 and cast once; ``dtype`` must be floating, as
    integer values would truncate the kernel.
    """
    dtype = floating_dtype(self.dtype if dtype is None else dtype,
                           "dequantize's dtype")
    if isinstance(getattr(self, self._leaf), jax.core.Tracer):
      return self._dequantize(dtype)
    return _eager_dequantize(self, dtype)  # one compiled program when eager

  def __jax_array__(self):
    # Lets jnp functions (and so an unwrapped model) take it as its values.
    return self.dequantize()

  def astype(self, dtype):
    """Same stored values with another compute dtype (floating dtypes only);
    any other dtype gives the dequantized array cast to it, as NumPy would."""
    if jnp.issubdtype(dtype, jnp.floating):
      return dataclasses.replace(self, dtype=jnp.dtype(dtype))
    return self.dequantize().astype(dtype)

  @property
  def T(self):
    return self.transpose()

  def _perm(self, perm: tuple) -> tuple[int, ...]:
    """`transpose`'s arguments as a permutation (none: reversed axes)."""
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
      perm = tuple(perm[0])
    return tuple(int(p) for p in perm) or tuple(reversed(range(self.ndim)))

  def _new_shape(self, shape: tuple) -> tuple[int, ...]:
    """`reshape`'s arguments as a shape, with a -1 resolved."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
      shape = tuple(shape[0])
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
      known = math.prod(s for s in shape if s != -1)
      shape = tuple(self.size // known if s == -1 else s for s in shape)
    return shape


@functools.partial(jax.jit, static_argnums=1)
def _eager_dequantize(kernel: StoredKernel, dtype) -> Array:
  return kernel._dequantize(dtype)
