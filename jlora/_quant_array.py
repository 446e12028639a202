"""`QuantizedArray`: a frozen kernel stored in 4 or 8 bits, blockwise absmax.

Storage, for a kernel of logical shape ``(*stacked, *R)`` (``R`` the shape of
one stacked slice, ``n = prod(R)``, block size ``B``): the elements of each
slice, flattened row-major, are cut into blocks of ``B`` consecutive values;
each block is divided by its absolute maximum and every value replaced by the
index of the nearest entry of a code table (16 entries for 4 bits). Blocks
never cross a stacked axis, so a scan over the leading axis slices every
stored array the same way.

When ``R[-1] % B == 0`` (every Llama projection) the blocks lie along the
last axis and the stored arrays keep the kernel's axes:

- ``codes``: uint8 ``(*stacked, *R[:-1], R[-1] // 2)``, two 4-bit codes per
  byte, the first value of each pair in the high nibble (as bitsandbytes
  packs them); int8 ``(*stacked, *R)`` for the 8-bit method.
- ``absmax``: ``(*stacked, *R[:-1], R[-1] // B)``, float32, or uint8 with
  double quantization.

Otherwise each slice is stored flat, zero-padded to a whole number of blocks:
``codes (*stacked, npad // 2)``, ``absmax (*stacked, npad // B)``.

Double quantization (QLoRA): the ``m`` block scales of each slice, minus
their mean ``offset``, are quantized blockwise again, 256 per block, to 8-bit
indices into bitsandbytes' signed "dynamic" code, with float32 second-level
scales ``absmax2 (*stacked, max(1, ceil(m / 256)))`` and ``offset
(*stacked,)``.

Non-finite values (inf, NaN, or a float64 value beyond float32's range) have
no code. `quantize_array` raises on them when its input is concrete; on a
traced input (under `jit`) it cannot, and quantizes each as the nearest
finite value its block can hold: ``+-inf`` as ``+-absmax`` of the block's
finite values, NaN as 0. A block's scale is the maximum of its finite
values, so every other value of the kernel quantizes exactly as if the bad
one were 0: nothing spreads beyond the bad value itself (with double
quantization too, whose slice-wide mean would otherwise carry it to every
block of the slice).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._fp8 import Fp8Array
from jlora._stored_kernel import StoredKernel, floating_dtype

Array = Any

METHODS = ("nf4", "fp4", "int8")
BLOCK_SIZE2 = 256

# NF4 (Dettmers et al., 2023, appendix E; the same numbers as bitsandbytes):
# quantiles of N(0, 1), 8 on the positive side and 7 on the negative side
# plus an exact zero, each side scaled into [-1, 1]. Ascending, so a code is
# its index.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# FP4 as bitsandbytes encodes it: a sign bit over 3 bits of (exponent,
# mantissa) whose magnitudes are 0, 0.0625, 8, 12, 4, 6, 2, 3, scaled by 1/12.
_FP4_MAGNITUDES = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float64) / 12
FP4_VALUES = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(
    np.float32)


def dynamic_code(max_exponent_bits: int = 7) -> np.ndarray:
  """bitsandbytes' signed 8-bit "dynamic" code (256 ascending values).

  For exponent ``e = 0..6`` it holds ``10**(e-6)`` times the midpoints of
  ``2**e`` equal intervals of [0.1, 1], with both signs, plus 0 and 1
  (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", 2016).
  """
  values = [0.0, 1.0]
  for e in range(max_exponent_bits):
    edges = np.linspace(0.1, 1.0, 2 ** e + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - (max_exponent_bits - 1))
    values += list(mids) + list(-mids)
  return np.sort(np.array(values)).astype(np.float32)


DYNAMIC_VALUES = dynamic_code()


def code_values(method: str) -> np.ndarray:
  """The float32 value of each code of a 4-bit method, indexed by code."""
  if method == "nf4":
    return NF4_VALUES
  if method == "fp4":
    return FP4_VALUES
  raise ValueError(f"method {method!r} has no 4-bit code table")


def _nearest_table(values: np.ndarray):
  """(midpoints, code of each sorted value) for nearest-value rounding.

  Equal values (FP4's +0 and -0) keep the lower code. A value exactly on a
  midpoint rounds down.
  """
  order = np.argsort(values, kind="stable")
  sorted_vals = values[order]
  keep = np.concatenate([[True], np.diff(sorted_vals) > 0])
  uniq, codes = sorted_vals[keep], order[keep]
  mids = ((uniq[:-1].astype(np.float64) + uniq[1:]) / 2).astype(np.float32)
  return mids, codes.astype(np.uint8)


def _to_codes(x: Array, values: np.ndarray) -> Array:
  """uint8 code of the nearest table value of each element of ``x``."""
  mids, codes = _nearest_table(values)
  if len(mids) <= 16:
    # A sum of comparisons fuses into one elementwise pass.
    idx = sum((x > m).astype(jnp.uint8) for m in mids.tolist())
  else:
    idx = jnp.searchsorted(jnp.asarray(mids), x, side="left").astype(jnp.uint8)
  if np.array_equal(codes, np.arange(len(codes))):
    return idx
  return jnp.asarray(codes)[idx]


def _layout(slice_shape: tuple[int, ...], block_size: int):
  """(structured, blocks per slice, padded size, absmax shape per slice)."""
  n = math.prod(slice_shape)
  structured = slice_shape[-1] % block_size == 0
  nblocks = -(-n // block_size)
  if structured:
    return True, nblocks, n, (*slice_shape[:-1], slice_shape[-1] // block_size)
  return False, nblocks, nblocks * block_size, (nblocks,)


def _check_args(method: str, block_size: int) -> int:
  """Validates (method, block_size); returns block_size as a Python int."""
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(
        f"unknown quantization method {method!r}; use one of {METHODS}")
  if (isinstance(block_size, (bool, np.bool_))
      or not isinstance(block_size, numbers.Integral)
      or block_size < 2 or block_size % 2):
    raise ValueError(
        f"block_size must be an even int >= 2 (64 is QLoRA's), got"
        f" {block_size!r}; 4-bit codes are packed two per byte, so a block"
        " holds an even number of values")
  return int(block_size)


def _blocks(x: Array, stacked: int, block_size: int) -> Array:
  """(*stacked, *G, block) float32 view of x's slices, zero-padded if flat."""
  lead, slice_shape = x.shape[:stacked], tuple(x.shape[stacked:])
  structured, nblocks, npad, g_shape = _layout(slice_shape, block_size)
  x = x.astype(jnp.float32)
  if structured:
    return x.reshape(*lead, *g_shape, block_size)
  x = x.reshape(*lead, -1)
  x = jnp.pad(x, [(0, 0)] * stacked + [(0, npad - x.shape[-1])])
  return x.reshape(*lead, nblocks, block_size)


def _double_quantize(absmax: Array, stacked: int):
  """(uint8 codes, absmax2, offset) of the block scales: QLoRA's 2nd level."""
  lead, g_shape = absmax.shape[:stacked], absmax.shape[stacked:]
  m = math.prod(g_shape)
  flat = absmax.reshape(*lead, m)
  # An empty slice (a zero-size kernel) has offset 0 and one second-level
  # block, so every stored array keeps a well-defined shape.
  offset = jnp.mean(flat, axis=-1) if m else jnp.zeros(lead, jnp.float32)
  centred = flat - offset[..., None]
  nb2 = max(1, -(-m // BLOCK_SIZE2))
  padded = jnp.pad(centred, [(0, 0)] * stacked + [(0, nb2 * BLOCK_SIZE2 - m)])
  padded = padded.reshape(*lead, nb2, BLOCK_SIZE2)
  absmax2 = jnp.max(jnp.abs(padded), axis=-1)
  safe = jnp.where(absmax2 > 0, absmax2, 1.0)
  q = _to_codes(padded / safe[..., None], DYNAMIC_VALUES)
  q = q.reshape(*lead, nb2 * BLOCK_SIZE2)[..., :m].reshape(absmax.shape)
  return q, absmax2, offset


def quantize_arrays(x: Array, method: str, block_size: int, double_quant: bool,
                    stacked: int):
  """(codes, absmax, absmax2, offset) of ``x``; see the module docstring."""
  blocks = _blocks(x, stacked, block_size)
  # Non-finite values stay out of the block scale and saturate: +-inf to
  # +-1, NaN to 0 (see the module docstring); finite values are unchanged.
  finite = jnp.isfinite(blocks)
  absmax = jnp.max(jnp.where(finite, jnp.abs(blocks), 0.0), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  normed = jnp.where(jnp.isnan(blocks), 0.0, blocks) / safe[..., None]
  normed = jnp.where(finite, normed, jnp.clip(normed, -1.0, 1.0))
  lead, slice_shape = x.shape[:stacked], tuple(x.shape[stacked:])
  structured, _, npad, _ = _layout(slice_shape, block_size)
  row = slice_shape if structured else (npad,)
  if method == "int8":
    codes = jnp.clip(jnp.round(normed * 127), -127, 127).astype(jnp.int8)
    codes = codes.reshape(*lead, *row)
  else:
    idx = _to_codes(normed, code_values(method))
    pairs = idx.reshape(*lead, *row[:-1], row[-1] // 2, 2)
    codes = (pairs[..., 0] << 4) | pairs[..., 1]
  if not double_quant:
    return codes, absmax, None, None
  q, absmax2, offset = _double_quantize(absmax, stacked)
  return codes, q, absmax2, offset


def _iota(shape: tuple[int, ...]) -> Array:
  """Row-major flat index of every position of ``shape`` (int32)."""
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return idx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray(StoredKernel):
  """A frozen kernel in 4-bit NF4/FP4 or 8-bit blockwise form (QLoRA's base).

  A pytree whose leaves are plain arrays (so `jit`, sharding, `lax.scan` and
  Orbax see ordinary arrays); it reports the kernel's logical ``shape`` and
  its compute ``dtype``, and `dequantize` gives ``code_value[code] * absmax``
  per block in that dtype. Make one with `jlora.quantize`.

  Fields (see `jlora._quant_array` for the storage layout):
    codes: packed 4-bit codes (uint8) or int8 codes.
    absmax: per-block absolute maxima, float32, or their uint8 codes with
      double quantization.
    absmax2: second-level float32 scales of ``absmax`` (double quantization)
      or None.
    offset: mean of each slice's block scales (double quantization) or None.
    method, block_size, slice_shape, dtype (static): the code table, the
      block size, the logical shape of one stacked slice, the compute dtype.
  """

  codes: Array
  absmax: Array
  absmax2: Array = None
  offset: Array = None
  method: str = dataclasses.field(metadata=dict(static=True), default="nf4")
  block_size: int = dataclasses.field(metadata=dict(static=True), default=64)
  slice_shape: tuple = dataclasses.field(metadata=dict(static=True),
                                         default=())
  dtype: Any = dataclasses.field(metadata=dict(static=True),
                                 default=jnp.dtype(jnp.bfloat16))

  _leaf = "codes"

  # -- array-like metadata --------------------------------------------------

  @property
  def double_quant(self) -> bool:
    return self.absmax2 is not None

  @property
  def _g_ndim(self) -> int:
    return len(_layout(self.slice_shape, self.block_size)[3])

  @property
  def stacked(self) -> int:
    """Number of leading stacked axes (blocks never cross them)."""
    return self.absmax.ndim - self._g_ndim

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.absmax.shape[:self.stacked]) + tuple(self.slice_shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (codes and all scales)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
               for x in (self.codes, self.absmax, self.absmax2, self.offset)
               if x is not None)

  @property
  def sharding(self):
    """The sharding the dequantized kernel gets: that of ``codes``' axes.

    None unless ``codes`` is a concrete array with a `NamedSharding`.
    """
    sharding = getattr(self.codes, "sharding", None)
    if isinstance(self.codes, jax.core.Tracer) or not isinstance(
        sharding, jax.sharding.NamedSharding):
      return None
    spec = tuple(sharding.spec) + (None,) * (self.codes.ndim -
                                             len(sharding.spec))
    if self.codes.ndim != self.ndim:  # flat storage: only stacked axes shard
      spec = spec[:self.stacked] + (None,) * (self.ndim - self.stacked)
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec))

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    try:
      shape = self.shape
    except Exception:  # leaves that are not arrays (a mask, a spec)
      shape = "?"
    return (f"QuantizedArray({self.method}, shape={shape},"
            f" dtype={jnp.dtype(self.dtype).name}, block_size="
            f"{self.block_size}{dq})")

  # -- values ---------------------------------------------------------------

  def block_scales(self) -> Array:
    """float32 per-block absmax, (*stacked, *G), undoing double quantization."""
    if not self.double_quant:
      return self.absmax.astype(jnp.float32)
    if not isinstance(self.codes, jax.core.Tracer):
      return _block_scales_jit(self)
    return self._block_scales()

  def _block_scales(self) -> Array:
    g_shape = tuple(self.absmax.shape[self.stacked:])
    code = jnp.asarray(DYNAMIC_VALUES)[self.absmax.astype(jnp.int32)]
    # Each scale's second-level block, from its flat index in the slice.
    block = _iota(g_shape) // BLOCK_SIZE2
    absmax2 = jnp.take(self.absmax2, block, axis=-1)
    offset = self.offset.reshape(self.offset.shape + (1,) * len(g_shape))
    return code * absmax2 + offset

  def _dequantize(self, dtype) -> Array:
    lead = tuple(self.absmax.shape[:self.stacked])
    structured, _, npad, g_shape = _layout(self.slice_shape, self.block_size)
    row = self.slice_shape if structured else (npad,)
    if self.method == "int8":
      values = self.codes.astype(jnp.float32) * (1.0 / 127.0)
    else:
      table = jnp.asarray(code_values(self.method))
      hi = (self.codes >> 4).astype(jnp.int32)
      lo = (self.codes & 0xF).astype(jnp.int32)
      values = jnp.stack([table[hi], table[lo]], axis=-1)
    values = values.reshape(*lead, *g_shape, self.block_size)
    scales = (self._block_scales() if self.double_quant else
              self.absmax.astype(jnp.float32))
    out = values * scales[..., None]
    out = out.reshape(*lead, *row)
    if not structured:
      out = out[..., :math.prod(self.slice_shape)].reshape(*lead,
                                                           *self.slice_shape)
    return out.astype(dtype)

  def reshape(self, *shape) -> "QuantizedArray | Array":
    """Quantized while the stacked axes stay; else the dequantized reshape.

    Blocks follow the row-major order of each slice, which any reshape of the
    slice preserves, so only the stored arrays' views change.
    """
    shape = self._new_shape(shape)
    k = self.stacked
    lead = self.shape[:k]
    if shape == self.shape:
      return self
    if (shape[:k] != lead or len(shape) <= k
        or math.prod(shape[k:]) != math.prod(self.slice_shape)):
      return self.dequantize().reshape(shape)
    new_slice = shape[k:]
    old_s, _, old_pad, _ = _layout(self.slice_shape, self.block_size)
    new_s, _, new_pad, new_g = _layout(new_slice, self.block_size)
    per_byte = 1 if self.method == "int8" else 2
    row = new_slice if new_s else (new_pad,)
    codes = self.codes.reshape(*lead, *row[:-1], row[-1] // per_byte)
    absmax = self.absmax.reshape(*lead, *new_g)
    return dataclasses.replace(self, codes=codes, absmax=absmax,
                               slice_shape=tuple(new_slice))

  def transpose(self, *perm) -> "QuantizedArray | Array":
    """Itself for the identity permutation, else the dequantized transpose."""
    perm = self._perm(perm)
    if perm == tuple(range(self.ndim)):
      return self
    return jnp.transpose(self.dequantize(), perm)


_block_scales_jit = jax.jit(QuantizedArray._block_scales)


def is_quantized(x: Any) -> bool:
  """A stored frozen kernel: a `QuantizedArray` or an FP8 `Fp8Array`."""
  return isinstance(x, (QuantizedArray, Fp8Array))


def quantize_array(x: Array, method: str = "nf4", *, block_size: int = 64,
                   double_quant: bool = True, dtype: Any = jnp.bfloat16,
                   stacked: int = 0, name: str | None = None
                   ) -> QuantizedArray:
  """One array to a `QuantizedArray`; shardings follow ``x``'s where they can.

  ``x`` must be floating point (float64 is quantized from its float32
  values); ``dtype``, the compute dtype, too. ``stacked``: number of leading
  axes that blocks do not cross. ``name`` (the kernel's path) is used in
  error messages.

  Raises:
    ValueError: a bad method, block size or dtype; an integer, bool or
      already quantized ``x``; or, when ``x`` is concrete, inf or NaN values
      in it (under `jit` they are saturated instead; see the module
      docstring).

  Examples:
    >>> q = quantize_array(w, "nf4", name="dense/kernel")
    >>> q.dequantize(jnp.float32).shape == w.shape
    True
  """
  what = f"'{name}'" if name else "the array"
  block_size = _check_args(method, block_size)
  if is_quantized(x):
    raise ValueError(
        f"{what} is already quantized ({x.method}, block_size"
        f" {x.block_size}); quantizing its values again would add a second"
        " rounding error. Pass x.dequantize(jnp.float32) to re-quantize on"
        " purpose")
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{what} has dtype {jnp.dtype(x.dtype).name}; only floating point"
        " kernels can be quantized (their values are scaled into [-1, 1]);"
        " cast it to a float dtype first, or leave it out of the targets")
  if not isinstance(double_quant, (bool, np.bool_)):
    raise ValueError(f"double_quant must be a bool, got {double_quant!r}")
  double_quant = bool(double_quant)
  shape = tuple(x.shape)
  if not (isinstance(stacked, numbers.Integral)
          and 0 <= stacked < len(shape)):
    raise ValueError(
        f"stacked={stacked!r} leaves no axis to quantize in shape {shape} of"
        f" {what}")
  stacked = int(stacked)
  slice_shape = shape[stacked:]
  static = dict(method=method, block_size=block_size,
                slice_shape=slice_shape,
                dtype=floating_dtype(dtype, "the compute dtype"))

  impl = functools.partial(_quantize_impl, method, block_size, double_quant,
                           stacked, tuple(static.items()))
  if isinstance(x, jax.core.Tracer):
    return impl(x)
  bad = int(_count_nonfinite(x))
  if bad:
    wide = (" (or beyond float32's range, where quantization computes)"
            if jnp.dtype(x.dtype).itemsize > 4 else "")
    raise ValueError(
        f"{what} has {bad} non-finite value{'s' * (bad > 1)} (inf or NaN"
        f"{wide}) of {x.size}; a block scale cannot represent them. Fix the"
        " kernel (e.g. jnp.nan_to_num) or leave it out of the targets")
  shardings = _out_shardings(x, stacked, static, double_quant)
  return _quantize_program(method, block_size, double_quant, stacked,
                           tuple(static.items()), shardings)(x)


def _quantize_impl(method, block_size, double_quant, stacked, static, x):
  codes, absmax, absmax2, offset = quantize_arrays(
      x, method, block_size, double_quant, stacked)
  return QuantizedArray(codes, absmax, absmax2, offset, **dict(static))


@functools.lru_cache(maxsize=256)
def _quantize_program(method, block_size, double_quant, stacked, static,
                      shardings):
  """One jitted quantization per setting and placement, compiled once per
  input shape: loading a model quantizes hundreds of same-shaped slices."""
  impl = functools.partial(_quantize_impl, method, block_size, double_quant,
                           stacked, static)
  if shardings is None:
    return jax.jit(impl)
  return jax.jit(impl, out_shardings=shardings)


@jax.jit
def _count_nonfinite(x: Array) -> Array:
  # In float32, as quantization computes: a float64 beyond its range counts.
  return jnp.sum(~jnp.isfinite(x.astype(jnp.float32)))


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _out_shardings(x, stacked: int, static: dict, double_quant: bool):
  """A `QuantizedArray` of NamedShardings following ``x``'s, or None.

  Each stored axis keeps the spec of the kernel axis it comes from when the
  mesh axes divide its length; the rest is replicated.
  """
  sharding = getattr(x, "sharding", None)
  if isinstance(x, jax.core.Tracer) or not isinstance(
      sharding, jax.sharding.NamedSharding):
    return None
  mesh = sharding.mesh
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  structured, nblocks, npad, g_shape = _layout(static["slice_shape"],
                                               static["block_size"])
  per_byte = 1 if static["method"] == "int8" else 2
  lead = tuple(x.shape[:stacked])
  row = static["slice_shape"] if structured else (npad,)
  codes_shape = (*lead, *row[:-1], row[-1] // per_byte)
  absmax_shape = (*lead, *g_shape)
  src = spec if structured else spec[:stacked] + (None,)

  def fit(shape):
    entries = [e if e is not None and s % _axis_size(mesh, e) == 0 else None
               for e, s in zip(src, shape)]
    return jax.sharding.NamedSharding(mesh,
                                      jax.sharding.PartitionSpec(*entries))

  lead_spec = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*[
          e if e is not None and s % _axis_size(mesh, e) == 0 else None
          for e, s in zip(spec[:stacked], lead)]))
  second = None
  if double_quant:
    second = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*lead_spec.spec, None))
  return QuantizedArray(fit(codes_shape), fit(absmax_shape), second,
                        lead_spec if double_quant else None, **static)
