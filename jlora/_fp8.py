"""`Fp8Array`: a frozen kernel in float8 e4m3 with power-of-two scales, and
its matrix product with activations quantized on the fly.

Storage, for a kernel ``w`` whose axes have roles ('b' stacked, 'i' input,
'o' output; see `jlora.apply`):

- ``values``: float8_e4m3fn, the kernel's own shape,
  ``values = round_e4m3(w / scale)``;
- ``scale``: float32, the kernel's ndim, broadcastable against it. Per output
  channel (``scaling="channel"``): size 1 on the input axes, so one scale per
  (stacked index, output index). Per tensor (``"tensor"``): size 1 on every
  axis but the stacked ones.
- ``values_t`` (``transposed_copy=True``): the same e4m3 values again in the
  other GEMM order, so that each product reads a stored array with its
  contracted axes last (what a GPU's FP8 GEMM reads): the forward product
  contracts the input axes, the backward the output axes.

Each scale is the power of two ``2**k`` with the smallest ``k`` such that
``amax / 2**k <= 448`` (e4m3's largest finite value), ``amax`` the absolute
maximum it covers (1 for an all-zero channel). Dividing by a power of two is
exact, so ``values`` is ``w`` rounded to e4m3's 3-bit mantissa, and
``dequantize`` (``values * scale``) is exact in float32.

The product ``x @ w`` (any `lax.dot_general` contracting only input axes,
see `dot_general`) quantizes ``x`` the same way with current scaling, per row
(every index of its uncontracted axes) for a per-channel kernel or per tensor
for a per-tensor kernel, and computes

    y = (sx * sw) * sum_k xq[.., k] wq[k, ..]

with float32 accumulation. The backward pass gives ``x`` the gradient
``dx = dy @ w^T`` in FP8 too: ``dy * sw`` (the kernel's per-channel scales
vary along the contracted axis there, so they are folded into ``dy``) is
quantized per row to e4m3 and multiplied with the same e4m3 kernel. The
kernel gets no gradient, and nothing dense of it is formed. Per-row and
per-channel scales do not vary along the contracted axis, so applying them
after the integer-like e4m3 product is exact.

Where the product runs (the array's static ``product``):

- ``"auto"``: FP8 on an NVIDIA GPU of compute capability >= 8.9 (Ada,
  Hopper, Blackwell), where XLA rewrites the product into a cuBLASLt FP8
  GEMM; elsewhere the kernel is dequantized to the compute dtype per use
  (recomputed in the backward pass, not saved) and multiplied as it is.
- ``"fp8"``: the FP8 numerics everywhere: the GPU's FP8 GEMM where there is
  one, else an emulation that casts both e4m3 operands to float32 and does
  the same math (so CPU tests pin the GPU path's numerics).
- ``"upcast"``: always dequantize per use.

On the GPU the forward product runs at XLA's default precision (cuBLASLt's
fast FP8 accumulation, as flax's fp8 ops) and the backward product at
HIGHEST; the emulation accumulates in float32 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlora._shapes import reshape_groups
from jlora._stored_kernel import StoredKernel

Array = Any

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E4M3_MAX = 448.0
SCALINGS = ("channel", "tensor")
PRODUCTS = ("auto", "fp8", "upcast")


# -- scaling ------------------------------------------------------------------

def pow2_scale(amax: Array) -> Array:
  """float32 ``2**k``, smallest ``k`` with ``amax / 2**k <= 448``.

  With ``amax = m * 2**e`` (``0.5 <= m < 1``): ``448 = 0.875 * 2**9``, so
  ``k = e - 9``, or ``e - 8`` when ``m > 0.875``. An all-zero row gets 1; a
  non-finite ``amax`` is kept as the scale, so NaN/inf propagate.
  """
  amax = jnp.asarray(amax, jnp.float32)
  m, e = jnp.frexp(amax)
  k = jnp.clip(e - 9 + (m > 0.875).astype(e.dtype), -126, 127)
  scale = jnp.ldexp(jnp.ones_like(amax), k)
  scale = jnp.where(amax > 0, scale, 1.0)
  return jnp.where(jnp.isfinite(amax), scale, amax)


def to_e4m3(x: Array, scale: Array) -> Array:
  """``round_e4m3(x / scale)``, saturating at +-448 (NaN stays NaN)."""
  q = x.astype(jnp.float32) / scale
  return jnp.clip(q, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
  """(e4m3 values, float32 scales) with one scale per index of the axes
  not in `axes` (the scales keep x's ndim, size 1 on `axes`)."""
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  scale = pow2_scale(amax)
  return to_e4m3(x, scale), scale


# -- the stored kernel --------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Array(StoredKernel):
  """A frozen kernel in float8 e4m3 with power-of-two scales (an FP8 base).

  A pytree of two arrays (so `jit`, sharding, `lax.scan` and Orbax see plain
  arrays) that reports the kernel's logical ``shape`` and compute ``dtype``;
  `dequantize` gives ``values * scale`` in that dtype. Under `jlora.wrap`
  its matrix products run in FP8 (see `jlora._fp8`). Make one with
  ``jlora.quantize(params, "fp8")`` or `jlora.quant.quantize_fp8`.

  Fields:
    values: float8_e4m3fn, the kernel's shape.
    scale: float32 powers of two, the kernel's ndim, size 1 on the input
      axes (per output channel) or on all but the stacked axes (per tensor).
    dtype (static): the compute dtype it dequantizes to.
    scaling (static): "channel" or "tensor"; activations are scaled per row
      against a per-channel kernel and per tensor against a per-tensor one.
    product (static): "auto", "fp8" or "upcast": where products run FP8.
    values_t: None, or the same e4m3 values in a second axis order
      (``quantize_fp8(..., transposed_copy=True)``): GPUs' FP8 GEMMs read
      both operands with the contracted axes last, and the forward product
      contracts the input axes, the backward the output axes, so with both
      orders stored neither is transposed per step.
    t_tail (static): with ``values_t``, the kernel axes its trailing axes
      are, counted from the end (``(-1, -2)`` for a transposed last pair);
      its leading axes are the kernel's own, so a scan or an expert
      selection slices both arrays alike. `t_axes` gives the whole order.

  Examples:
    >>> q = jlora.quantize({"k": {"kernel": w}}, "fp8")["k"]["kernel"]
    >>> q.values.dtype, q.scale.shape        # w: (64, 128)
    (dtype(float8_e4m3fn), (1, 128))
  """

  values: Array
  scale: Array
  dtype: Any = dataclasses.field(metadata=dict(static=True),
                                 default=jnp.dtype(jnp.bfloat16))
  scaling: str = dataclasses.field(metadata=dict(static=True),
                                   default="channel")
  product: str = dataclasses.field(metadata=dict(static=True),
                                   default="auto")
  values_t: Array = None
  t_tail: tuple = dataclasses.field(metadata=dict(static=True), default=None)

  method = "fp8"
  _leaf = "values"

  # -- array-like metadata --------------------------------------------------

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (values, scales and any transposed copy)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
               for x in (self.values, self.scale, self.values_t)
               if x is not None)

  @property
  def t_axes(self) -> tuple[int, ...] | None:
    """With ``values_t``: the kernel axis each of its axes is."""
    return None if self.t_tail is None else _full(self.ndim, self.t_tail)

  def orders(self) -> list[tuple[Array, tuple[int, ...]]]:
    """(stored array, the kernel axis each of its axes is): ``values``
    and, if stored, ``values_t``."""
    out = [(self.values, tuple(range(self.ndim)))]
    if self.values_t is not None:
      out.append((self.values_t, self.t_axes))
    return out

  @property
  def stacked(self) -> int:
    """Leading axes a scan can slice: the scale is per index along them."""
    n = 0
    for size, s in zip(self.shape, self.scale.shape):
      if s != size:
        break
      n += 1
    return n

  @property
  def sharding(self):
    """The NamedSharding of ``values`` (the kernel's), or None."""
    sharding = getattr(self.values, "sharding", None)
    if isinstance(self.values, jax.core.Tracer) or not isinstance(
        sharding, jax.sharding.NamedSharding):
      return None
    return sharding

  def __repr__(self) -> str:
    try:
      shape = self.shape
    except Exception:  # leaves that are not arrays (a mask, a spec)
      shape = "?"
    copy = "" if self.values_t is None else ", transposed_copy=True"
    return (f"Fp8Array(e4m3, shape={shape}, dtype={jnp.dtype(self.dtype).name},"
            f" scaling={self.scaling}, product={self.product}{copy})")

  # -- values ---------------------------------------------------------------

  def _dequantize(self, dtype) -> Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

  # -- layout ops that keep the FP8 form --------------------------------------

  def transpose(self, *perm) -> "Fp8Array":
    perm = self._perm(perm)
    identity = tuple(range(self.ndim))
    if perm == identity:
      return self
    scale = jnp.transpose(self.scale, perm)
    if self.values_t is None:
      return dataclasses.replace(self, values=jnp.transpose(self.values, perm),
                                 scale=scale)
    # Both stored orders stay as stored, their axes renamed (kernel axis a
    # is axis perm.index(a) of the transpose): the products keep reading
    # them without a transpose. The one in the new axis order, if any,
    # becomes ``values``.
    stored = [(a, tuple(perm.index(k) for k in axes))
              for a, axes in self.orders()]
    for i, (array, axes) in enumerate(stored):
      if axes == identity:
        other, other_axes = stored[1 - i]
        return dataclasses.replace(self, values=array, scale=scale,
                                   values_t=other, t_tail=_tail(other_axes))
    return dataclasses.replace(self, values=jnp.transpose(self.values, perm),
                               scale=scale, values_t=stored[1][0],
                               t_tail=_tail(stored[1][1]))

  def reshape(self, *shape) -> "Fp8Array | Array":
    """FP8 unless an axis group mixes per-index and shared scales.

    Axes are regrouped as `lax.reshape` does (contiguous groups of equal
    size); a group of axes along which the scale varies (or of axes along
    which it is constant) becomes new axes of the same kind. Merging an
    input axis with an output axis of a per-channel kernel would need a
    scale per element: that reshape gives the dequantized array.
    """
    shape = self._new_shape(shape)
    if shape == self.shape:
      return self
    groups = reshape_groups(self.shape, shape)
    if groups is None:
      return self.dequantize().reshape(shape)
    scale_shape = []
    for old, new in groups:
      kinds = {self.scale.shape[k] != 1 for k in old if self.shape[k] != 1}
      if len(kinds) > 1:
        return self.dequantize().reshape(shape)
      per_index = kinds.pop() if kinds else False
      scale_shape += [shape[j] if per_index else 1 for j in new]
    # The transposed copy is not reshaped along (it serves the stored
    # kernel's own products); this view uses its values alone.
    return dataclasses.replace(self, values=self.values.reshape(shape),
                               scale=self.scale.reshape(scale_shape),
                               values_t=None, t_tail=None)


def is_fp8(x: Any) -> bool:
  return isinstance(x, Fp8Array)


def check_options(scaling: str, product: str) -> None:
  if scaling not in SCALINGS:
    raise ValueError(f"unknown FP8 scaling {scaling!r}; use one of {SCALINGS}")
  if product not in PRODUCTS:
    raise ValueError(f"unknown FP8 product {product!r}; use one of {PRODUCTS}")


def quantize_array(x: Array, layout: str, *, scaling: str = "channel",
                   dtype: Any = jnp.bfloat16, product: str = "auto",
                   transposed_copy: bool = False, path: str = "") -> Fp8Array:
  """One kernel to an `Fp8Array`; shardings follow ``x``'s.

  ``layout``: one role letter per axis ('b' stacked, 'i' input, 'o'
  output). With ``transposed_copy`` the values are stored a second time in
  the other GEMM order (see `Fp8Array`). A concrete kernel with NaN or inf
  values raises ValueError naming ``path``.
  """
  check_options(scaling, product)
  if len(layout) != x.ndim or set(layout) - set("bio") or "i" not in layout:
    raise ValueError(
        f"layout '{layout}' for '{path}' does not fit shape {tuple(x.shape)}:"
        " give one letter per axis, 'b' stacked, 'i' input (at least one),"
        " 'o' output")
  shared = "i" if scaling == "channel" else "io"
  axes = tuple(k for k, r in enumerate(layout) if r in shared)
  static = dict(dtype=jnp.dtype(dtype), scaling=scaling, product=product,
                t_tail=_tail(_copy_order(layout)) if transposed_copy else None)

  items = tuple(static.items())
  if isinstance(x, jax.core.Tracer):
    return _quantize_impl(axes, items, x)[0]
  shardings = _out_shardings(x, axes, static)
  out, finite = _quantize_program(axes, items, shardings)(x)
  if not bool(finite):
    raise ValueError(
        f"kernel '{path}' has NaN or inf values, which have no FP8 scale;"
        " repair the weights, or leave this kernel out of quantization"
        " (exclude=...)")
  return out


def _tail(axes: tuple[int, ...]) -> tuple[int, ...]:
  """A full axis order as `Fp8Array.t_tail`: the part after its longest
  unpermuted prefix, counted from the end."""
  n = len(axes)
  lead = 0
  while lead < n and axes[lead] == lead:
    lead += 1
  return tuple(a - n for a in axes[lead:])


def _full(ndim: int, tail: tuple[int, ...]) -> tuple[int, ...]:
  """`_tail`'s inverse for an array of ``ndim`` axes."""
  lead = ndim - len(tail)
  return tuple(range(lead)) + tuple(ndim + a for a in tail)


def _copy_order(layout: str) -> tuple[int, ...]:
  """Axis order of the transposed copy: the input axes last (the forward
  product's GEMM order), or, where the kernel already has them last, the
  output axes last (the backward product's)."""
  def order(last):
    return tuple(k for k, r in enumerate(layout) if r == "b") + tuple(
        k for k, r in enumerate(layout) if r not in ("b", last)) + tuple(
        k for k, r in enumerate(layout) if r == last)
  forward = order("i")
  return order("o") if forward == tuple(range(len(layout))) else forward


def _quantize_impl(axes, static, x):
  values, scale = quantize(x.astype(jnp.float32), axes)
  static = dict(static)
  values_t = (None if static["t_tail"] is None else
              jnp.transpose(values, _full(values.ndim, static["t_tail"])))
  return (Fp8Array(values, scale, values_t=values_t, **static),
          jnp.isfinite(scale).all())


@functools.lru_cache(maxsize=256)
def _quantize_program(axes, static, shardings):
  """One jitted quantization per setting and placement (compiled once per
  input shape, not once per kernel)."""
  impl = functools.partial(_quantize_impl, axes, static)
  if shardings is None:
    return jax.jit(impl)
  return jax.jit(impl, out_shardings=shardings)


def _out_shardings(x, axes, static):
  """(Fp8Array of NamedShardings, flag sharding) following x's, or None."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  P = jax.sharding.PartitionSpec
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  scale_spec = P(*[None if k in axes else e for k, e in enumerate(spec)])
  named = lambda s: jax.sharding.NamedSharding(sharding.mesh, s)
  copy = None
  if static["t_tail"] is not None:
    copy = named(P(*[spec[a] for a in _full(x.ndim, static["t_tail"])]))
  return (Fp8Array(named(P(*spec)), named(scale_spec), values_t=copy,
                   **static), named(P()))


# -- the product ----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def gpu_has_fp8(backend: str) -> bool:
  """Whether every device of `backend` is an NVIDIA GPU with FP8 GEMMs."""
  if backend != "gpu":
    return False
  for device in jax.devices(backend):
    cc = str(getattr(device, "compute_capability", "") or "")
    try:
      major, minor = (int(p) for p in cc.split(".")[:2])
    except ValueError:  # not CUDA (ROCm reports a gfx name)
      return False
    if (major, minor) < (8, 9):
      return False
  return True


def product_path(product: str) -> str:
  """"gpu" (XLA's FP8 GEMM), "emulate" or "upcast" for this backend."""
  native = gpu_has_fp8(jax.default_backend())
  if product == "upcast":
    return "upcast"
  if native:
    return "gpu"
  return "emulate" if product == "fp8" else "upcast"


class _Spec(NamedTuple):
  """Static description of one product ``dot_general(x, w)``."""
  xc: tuple[int, ...]
  kc: tuple[int, ...]
  xb: tuple[int, ...]
  kb: tuple[int, ...]
  x_ndim: int
  w_ndim: int
  x_dtype: Any
  out_dtype: Any
  rowwise: bool
  emulate: bool
  # pos[k]: the axis of the stored array that kernel axis k is, for the
  # array each product reads (values, or its transposed copy).
  fwd_pos: tuple[int, ...]
  bwd_pos: tuple[int, ...]

  @property
  def x_free(self) -> list[int]:
    return [i for i in range(self.x_ndim) if i not in self.xc + self.xb]

  @property
  def k_free(self) -> list[int]:
    return [k for k in range(self.w_ndim) if k not in self.kc + self.kb]

  @property
  def gemm_dtype(self):
    """What the GEMM writes: the output dtype where cuBLASLt can."""
    if self.out_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                          jnp.dtype(jnp.float32)):
      return self.out_dtype
    return jnp.dtype(jnp.float32)


def dot_general(x: Array, w: Fp8Array, kernel_is_rhs: bool, params: dict,
                bind) -> Array:
  """``lax.dot_general`` of ``x`` and ``w`` (``params``: the equation's).

  FP8 (see the module docstring) when ``w``'s product setting and the
  backend call for it and the product contracts only axes along which the
  scale is shared; otherwise ``bind(x, dense)`` (operands in the equation's
  order) with ``w`` dequantized for this use, recomputed rather than saved
  for the backward pass. ``bind`` runs the original equation.
  """
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  if kernel_is_rhs:
    xc, kc, xb, kb = lc, rc, lb, rb
  else:
    xc, kc, xb, kb = rc, lc, rb, lb
  xc, kc, xb, kb = (tuple(int(i) for i in t) for t in (xc, kc, xb, kb))
  path = product_path(w.product)
  contractible = all(w.scale.shape[k] == 1 for k in kc)
  if path == "upcast" or not contractible or not jnp.issubdtype(
      x.dtype, jnp.floating):
    return upcast_product(x, w, kernel_is_rhs, bind)
  out_dtype = jnp.dtype(params.get("preferred_element_type") or
                        jnp.result_type(x.dtype, w.dtype))
  k_free = [k for k in range(w.ndim) if k not in kc + kb]
  w_fwd, fwd_pos = _stored_order(w, kc)
  w_bwd, bwd_pos = _stored_order(w, tuple(k_free))
  spec = _Spec(xc, kc, xb, kb, x.ndim, w.ndim, jnp.dtype(x.dtype), out_dtype,
               w.scaling == "channel", path == "emulate", fwd_pos, bwd_pos)
  y = _product(x, w_fwd, w_bwd, w.scale, spec)
  if kernel_is_rhs:
    return y
  # dot_general(w, x) puts the kernel's free axes before x's.
  nb, nx, nk = len(xb), len(spec.x_free), len(spec.k_free)
  perm = (list(range(nb)) + list(range(nb + nx, nb + nx + nk)) +
          list(range(nb, nb + nx)))
  return jnp.transpose(y, perm)


def _stored_order(w: Fp8Array, contracted: tuple[int, ...]):
  """(stored array, pos) for a product contracting ``contracted``: the
  stored order with those axes last if there is one (the GEMM reads it as
  it is), else ``values``; ``pos[k]`` is kernel axis k's axis in it."""
  n = len(contracted)
  for array, axes in w.orders():
    if n and set(axes[len(axes) - n:]) == set(contracted):
      return array, tuple(axes.index(k) for k in range(w.ndim))
  return w.values, tuple(range(w.ndim))


def upcast_product(x, w: Fp8Array, kernel_is_rhs: bool, bind) -> Array:
  """``bind(x, dense)`` (operands in the equation's order) with ``w``
  dequantized for this use and recomputed, not saved, for the backward pass:
  the path of products XLA has no FP8 form for (grouped expert GEMMs)."""
  def product(x, w):
    dense = w.dequantize()
    return bind(*((x, dense) if kernel_is_rhs else (dense, x)))

  if not any(isinstance(v, jax.core.Tracer) for v in (x, w.values)):
    return product(x, w)  # eager: nothing is differentiated
  return jax.checkpoint(product,
                        policy=jax.checkpoint_policies.nothing_saveable)(x, w)


def _gemm(a, b, dims, spec: _Spec, precision):
  """The e4m3 x e4m3 product, float32-accumulated, in ``spec.gemm_dtype``.

  On the GPU XLA's gemm rewriter turns a dot of two FP8 operands into a
  cuBLASLt FP8 GEMM; the emulation does the same math in float32.
  """
  if spec.emulate:
    acc = lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                          precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    return acc.astype(spec.gemm_dtype)
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=spec.gemm_dtype)


def _scaled_gemm(a, sa, b, sb, dims, out_dtype, spec: _Spec, precision):
  """``sa * sb * (a @ b)`` for scalar scales, in XLA's scaled-FP8 form.

  ``dot(convert(a) * sa, convert(b) * sb)`` is the pattern XLA's GPU gemm
  rewriter fuses whole into one cuBLASLt FP8 GEMM (both scales as its
  float32 alpha factors, the output written once in ``out_dtype``).
  """
  a = a.astype(jnp.float32) * sa.reshape(())
  b = b.astype(jnp.float32) * sb.reshape(())
  return lax.dot_general(
      a, b, dims,
      precision=lax.Precision.HIGHEST if spec.emulate else precision,
      preferred_element_type=out_dtype)


def _x_out_scale(sx, spec: _Spec):
  """x's scales (x's ndim, size 1 on xc) broadcast to the output's axes."""
  lead = list(spec.xb) + spec.x_free
  t = jnp.transpose(sx, lead + list(spec.xc))
  return t.reshape(t.shape[:len(lead)] + (1,) * len(spec.k_free))


def _w_out_scale(scale, spec: _Spec):
  """w's scales (w's ndim, size 1 on kc) broadcast to the output's axes."""
  t = jnp.transpose(scale, list(spec.kb) + spec.k_free + list(spec.kc))
  nb = len(spec.kb)
  return t.reshape(t.shape[:nb] + (1,) * len(spec.x_free) +
                   t.shape[nb:nb + len(spec.k_free)])


def _per_gemm_scalar(scale, spec: _Spec) -> bool:
  return spec.rowwise is False and scale.size == 1


def _physical(axes, pos) -> tuple[int, ...]:
  return tuple(pos[k] for k in axes)


def _free_order(axes, pos) -> list[int]:
  """Where each of ``axes`` (kernel axes, a product's free axes in kernel
  order) lands among them in a product with the stored array: its order."""
  stored = sorted(axes, key=lambda k: pos[k])
  return [stored.index(k) for k in axes]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _product(x, w_fwd, w_bwd, scale, spec: _Spec):
  return _forward(x, w_fwd, scale, spec)


def _forward(x, values, scale, spec: _Spec):
  dims = ((spec.xc, _physical(spec.kc, spec.fwd_pos)),
          (spec.xb, _physical(spec.kb, spec.fwd_pos)))
  row_axes = spec.xc if spec.rowwise else tuple(range(x.ndim))
  xq, sx = quantize(x, row_axes)
  if _per_gemm_scalar(scale, spec):
    return _kernel_order(_scaled_gemm(xq, sx, values, scale, dims,
                                      spec.out_dtype, spec,
                                      lax.Precision.DEFAULT), spec)
  acc = _kernel_order(_gemm(xq, values, dims, spec, lax.Precision.DEFAULT),
                      spec)
  y = acc.astype(jnp.float32) * (_x_out_scale(sx, spec) *
                                 _w_out_scale(scale, spec))
  return y.astype(spec.out_dtype)


def _kernel_order(y, spec: _Spec):
  """The forward product's output with the kernel's free axes in kernel
  order (a stored copy may hold them in another)."""
  order = _free_order(spec.k_free, spec.fwd_pos)
  if order == sorted(order):
    return y
  lead = len(spec.xb) + len(spec.x_free)
  return jnp.transpose(y, list(range(lead)) + [lead + j for j in order])


def _product_fwd(x, w_fwd, w_bwd, scale, spec: _Spec):
  # Only the stored kernel is kept for the backward pass: the kernel gets
  # no gradient, so x is not needed.
  return _forward(x, w_fwd, scale, spec), (w_bwd, scale)


def _product_bwd(spec: _Spec, res, dy):
  values, scale = res
  nb, nx, nk = len(spec.xb), len(spec.x_free), len(spec.k_free)
  k_pos = tuple(range(nb + nx, nb + nx + nk))
  dims = ((k_pos, _physical(spec.k_free, spec.bwd_pos)),
          (tuple(range(nb)), _physical(spec.kb, spec.bwd_pos)))
  if _per_gemm_scalar(scale, spec):
    gq, sg = quantize(dy, tuple(range(dy.ndim)))
    dx = _scaled_gemm(gq, sg, values, scale, dims, spec.x_dtype, spec,
                      lax.Precision.HIGHEST)
  else:
    # The kernel's scales vary along the contracted (output) axes here:
    # fold them into dy before quantizing it per row.
    g = dy.astype(jnp.float32) * _w_out_scale(scale, spec)
    gq, sg = quantize(g, k_pos if spec.rowwise else tuple(range(g.ndim)))
    acc = _gemm(gq, values, dims, spec, lax.Precision.HIGHEST)
    sg = sg.reshape(sg.shape[:nb + nx] + (1,) * len(spec.kc))
    dx = (acc.astype(jnp.float32) * sg).astype(spec.x_dtype)
  # dx's axes: x's batch, x's free, then w's contracted axes in the stored
  # array's order.
  kc_sorted = sorted(spec.kc, key=lambda k: spec.bwd_pos[k])
  pos = {}
  for j, i in enumerate(spec.xb):
    pos[i] = j
  for j, i in enumerate(spec.x_free):
    pos[i] = nb + j
  for i, k in zip(spec.xc, spec.kc):
    pos[i] = nb + nx + kc_sorted.index(k)
  dx = jnp.transpose(dx, [pos[i] for i in range(spec.x_ndim)])
  return dx, None, None, None


_product.defvjp(_product_fwd, _product_bwd)
