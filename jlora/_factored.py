"""A LoRA kernel as it flows through a traced function, kept in factored form.

Inside `jlora.wrap` each `LoRA` node becomes a `Factored` value: the current
kernel ``w`` (after whatever transposes, casts and reshapes the function
applied) plus the factors, with ``a`` laid out on the kernel's stacked and
input axes and ``b`` on its stacked and output axes, both in the kernel's
current axis order with the rank axis last. A matrix product against it is
computed as ``x @ w + scale * (x @ a) @ b``; any other use sees the fused
kernel.

A quantized base (`QuantizedArray`) stays quantized in ``w``: casts and
reshapes act on its metadata, a scan slices its stored arrays, and each
product dequantizes it right there (recomputed, not saved, for the backward
pass), so a stacked kernel is never dequantized whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jlora import _fp8, _grouped_gemm
from jlora._shapes import reshape_groups
from jlora._quant_array import is_quantized
from jlora.node import LoRA, _to_kernel_layout, base_array, is_multi
from jlora.targets import format_layout_dict, path_regex


class LayoutError(ValueError):
  """A kernel was contracted on other axes than its LoRA layout says."""


class _Mismatch(NamedTuple):
  path: str
  layout: str
  contracted: tuple[int, ...]
  kept: tuple[int, ...]
  suggestion: str


# The mismatches found while `jlora.wrap` traces one call: every product is
# checked and the call raises once, listing them all. Set only for the
# duration of that trace (see `collect_layout_errors`).
_MISMATCHES: contextvars.ContextVar = contextvars.ContextVar(
    "jlora_layout_mismatches", default=None)


@contextlib.contextmanager
def collect_layout_errors():
  """Raises one `LayoutError` for every mismatched kernel met inside."""
  found: list[_Mismatch] = []
  token = _MISMATCHES.set(found)
  try:
    yield
  except Exception as e:
    if found:  # the mismatch is the likelier cause: name it
      raise LayoutError(_layout_message(found)) from e
    raise
  finally:
    _MISMATCHES.reset(token)
  if found:
    raise LayoutError(_layout_message(found))


def _layout_message(found: list[_Mismatch]) -> str:
  def axes(m, role):
    return [k for k, r in enumerate(m.layout) if r == role]
  lines = [f"'{m.path}' is contracted on axes {list(m.contracted)} and keeps"
           f" {list(m.kept)}, but its layout '{m.layout}' has inputs"
           f" {axes(m, 'i')} and stacked axes {axes(m, 'b')}; it fits"
           f" '{m.suggestion}'" for m in found]
  # One regex per layer pattern, when every layer needs the same layout.
  by_rx: dict[str, set[str]] = {}
  for m in found:
    by_rx.setdefault(path_regex(m.path), set()).add(m.suggestion)
  fix = {}
  for m in found:
    rx = path_regex(m.path)
    fix.setdefault(rx if len(by_rx[rx]) == 1 else m.path, m.suggestion)
  what = (f"LoRA kernel {lines[0]}. " if len(found) == 1 else
          f"{len(found)} LoRA kernels are contracted on other axes than"
          " their layouts say:\n  " + "\n  ".join(lines) + "\n")
  return (f"{what}Re-create the adapters with jlora.apply(...,"
          f" layout={format_layout_dict(fix)}), or infer every kernel's"
          " layout from the model: layout = jlora.infer_layout(fn, params,"
          " *args); jlora.apply(params, ..., layout=layout).")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterIds:
  """A mixed batch's adapter index per example, (B,) ints (-1: the base).

  ``axis`` (static) names the batch axis of each adapted product's input
  (negative counts from the end); None infers it (`Factored._example_axis`).
  """

  ids: Any
  axis: int | None = dataclasses.field(metadata=dict(static=True),
                                       default=None)


def _to_kernel_order(x, roles: str, keep: str, first: str) -> Any:
  """(*stacked, *grouped, r) with axes grouped by role -> kernel order."""
  axes = [k for k, r in enumerate(roles) if r in keep]
  grouped = ([k for k in axes if roles[k] == "b"] +
             [k for k in axes if roles[k] == first])
  perm = [grouped.index(k) for k in axes] + [len(axes)]
  return jnp.transpose(x, perm)


@jax.tree_util.register_pytree_node_class
class Factored:
  """``w + scale * einsum(a, b)`` over the kernel's axes, never formed."""

  def __init__(self, w, a, b, gain, rng, ids, roles: str,
               orig: tuple[int, ...], scale: float, path: str, layout: str,
               dropout: float, group_scales: tuple[float, ...] = (),
               selected: bool = False):
    self.w, self.a, self.b = w, a, b
    # Whether stacked axes were indexed (experts picked per token): a
    # stacked axis such a product keeps is an expert axis, not a misread
    # output axis.
    self.selected = selected
    # Mixed-adapter batches (a `MultiLoRA` node): the rank axis holds
    # len(group_scales) adapters side by side, and example k of the batch
    # uses adapter ids[k] (negative: none).
    self.ids, self.group_scales = ids, group_scales
    # DoRA's per-output gain m / ||W'|| shaped like w with size-1 input axes.
    self.gain = gain
    # Dropout key of the adapter path, one per stacked index.
    self.rng = rng
    self.roles, self.orig = roles, orig
    self.scale, self.path, self.layout = scale, path, layout
    self.dropout = dropout

  _CHILDREN = ("w", "a", "b", "gain", "rng", "ids")
  _AUX = ("roles", "orig", "scale", "path", "layout", "dropout",
          "group_scales", "selected")

  def tree_flatten(self):
    return (tuple(getattr(self, k) for k in self._CHILDREN),
            tuple(getattr(self, k) for k in self._AUX))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @classmethod
  def from_node(cls, node: LoRA, rng=None, ids=None) -> "Factored":
    node.check_complete()
    # The base is frozen: no gradient ever flows to it, so its weight
    # gradient is never computed. A quantized base stays quantized here and
    # is dequantized at each use.
    w = jax.lax.stop_gradient(node.w)
    roles, shape = node.layout, tuple(w.shape)
    stacked = tuple(s for s, x in zip(shape, roles) if x == "b")
    in_sizes = tuple(s for s, x in zip(shape, roles) if x == "i")
    out_sizes = tuple(s for s, x in zip(shape, roles) if x == "o")
    node_a = node.a
    node_b = node.b if node.e is None else node.e[..., :, None] * node.b
    group_scales, scale = (), None
    if is_multi(node):
      if ids is None:
        raise ValueError(
            f"'{node.path}' stacks adapters {list(node.names)}: call the"
            " wrapped function with adapter_ids=ids, one adapter index per"
            " example")
      # (n, *stacked, in, r) -> (*stacked, in, n * r): the adapters become
      # one wide rank axis, so layout ops and scans treat them as one.
      n, r = node_a.shape[0], node_a.shape[-1]
      node_a = jnp.moveaxis(node_a, 0, -2).reshape(*node_a.shape[1:-1], n * r)
      node_b = jnp.moveaxis(node_b, 0, -3).reshape(*node_b.shape[1:-2], n * r,
                                                   node_b.shape[-1])
      group_scales, scale = tuple(float(s) for s in node.scales), 1.0
    else:
      ids = None
    r = node_a.shape[-1]
    a = _to_kernel_order(node_a.reshape(*stacked, *in_sizes, r), roles, "bi",
                         "i")
    b = jnp.moveaxis(node_b, -2, -1).reshape(*stacked, *out_sizes, r)
    b = _to_kernel_order(b, roles, "bo", "o")
    gain = None
    if node.m is not None:
      gain = _dora_gain(node, w, a, b)
    if node.dropout and rng is not None:
      rng = jax.random.split(rng, stacked) if stacked else rng
    else:
      rng = None
    return cls(w, a, b, gain, rng, ids, roles, tuple(range(len(shape))),
               node.scale if scale is None else scale, node.path, node.layout,
               node.dropout, group_scales)

  def replace(self, **kw) -> "Factored":
    fields = {k: getattr(self, k) for k in self._CHILDREN + self._AUX}
    fields.update(kw)
    return Factored(**fields)

  # -- structural ops that keep the factored form --------------------------

  def transpose(self, perm) -> "Factored":
    perm = tuple(int(p) for p in perm)
    roles = "".join(self.roles[p] for p in perm)

    def factor_perm(keep):
      old = [k for k, r in enumerate(self.roles) if r in keep]
      new = [p for p in perm if self.roles[p] in keep]
      return [old.index(p) for p in new] + [len(old)]

    return self.replace(
        w=_transpose(self.w, perm), roles=roles,
        orig=tuple(self.orig[p] for p in perm),
        a=jnp.transpose(self.a, factor_perm("bi")),
        b=jnp.transpose(self.b, factor_perm("bo")),
        gain=None if self.gain is None else jnp.transpose(self.gain, perm),
        rng=self._stacked_rng_transpose(perm))

  def _stacked_rng_transpose(self, perm):
    if self.rng is None or self.rng.ndim == 0:
      return self.rng
    old = [k for k, r in enumerate(self.roles) if r == "b"]
    return jnp.transpose(self.rng, [old.index(p) for p in perm
                                    if self.roles[p] == "b"])

  def astype(self, dtype) -> "Factored":
    return self.replace(w=self.w.astype(dtype), a=self.a.astype(dtype),
                        b=self.b.astype(dtype))

  def reshape(self, new_shape) -> "Factored | None":
    """Reshape that only splits/merges axes of one role; else None."""
    old = tuple(self.w.shape)
    new = tuple(int(s) for s in new_shape)
    groups = reshape_groups(old, new)
    if groups is None:
      return None
    roles, orig = [], []
    for old_axes, new_axes in groups:
      group_roles = {self.roles[k] for k in old_axes if old[k] != 1}
      if len(group_roles) > 1:
        return None
      role = group_roles.pop() if group_roles else (
          self.roles[old_axes[0]] if old_axes else "b")
      if not old_axes and role != "b":
        return None
      roles += [role] * len(new_axes)
      orig += [self.orig[old_axes[0]] if old_axes else -1] * len(new_axes)
    roles = "".join(roles)
    if "i" not in roles or "o" not in roles:
      return None
    # Size-1 axes that changed role (or appeared) make the factors' shapes
    # follow from the new kernel shape and roles alone.
    a_shape = [s for s, r in zip(new, roles) if r in "bi"] + [self.a.shape[-1]]
    b_shape = [s for s, r in zip(new, roles) if r in "bo"] + [self.b.shape[-1]]
    if math.prod(a_shape) != self.a.size or math.prod(b_shape) != self.b.size:
      return None
    gain = self.gain
    if gain is not None:
      gain = gain.reshape([1 if r == "i" else s for s, r in zip(new, roles)])
    rng = self.rng
    if rng is not None and rng.ndim:
      rng = rng.reshape([s for s, r in zip(new, roles) if r == "b"])
    return self.replace(w=self.w.reshape(new), a=self.a.reshape(a_shape),
                        b=self.b.reshape(b_shape), roles=roles,
                        orig=tuple(orig), gain=gain, rng=rng)

  def scanned(self):
    """The arrays a scan over the leading stacked axis slices."""
    w = self.w
    if is_quantized(w) and w.stacked < 1:
      w = base_array(w)  # quantized without a stacked axis: slice it dense
    return (w, self.a, self.b, self.gain, self.rng)

  def slice_leading(self, w, a, b, gain, rng) -> "Factored":
    """The value one step of a scan over the leading stacked axis sees."""
    return self.replace(w=w, a=a, b=b, gain=gain, rng=rng,
                        roles=self.roles[1:], orig=self.orig[1:])

  # -- expert selection (the rules are in jlora/_expert_rules.py) ----------

  def aligned(self) -> dict[str, tuple[Any, tuple, frozenset]]:
    """The arrays that follow the kernel's axes, for selections of them.

    name -> (array, axis map, broadcast axes). Entry d of the axis map is
    the kernel axis that the array's axis d follows, or None for an axis of
    its own (the rank axis); broadcast axes have size 1 (DoRA's gain on the
    input axes).
    """
    roles = self.roles

    def axes(keep):
      return tuple(k for k, r in enumerate(roles) if r in keep)

    every = tuple(range(len(roles)))
    rng_axes = axes("b") if self.rng is not None and self.rng.ndim else ()
    return {"w": (self.w, every, frozenset()),
            "a": (self.a, axes("bi") + (None,), frozenset()),
            "b": (self.b, axes("bo") + (None,), frozenset()),
            "gain": (self.gain, every, frozenset(axes("i"))),
            "rng": (self.rng, rng_axes, frozenset())}

  def with_selection(self, arrays: dict, roles: str,
                     orig: tuple[int, ...]) -> "Factored":
    """The kernel after a selection: new `aligned` arrays and axis roles."""
    return self.replace(**arrays, roles=roles, orig=tuple(orig),
                        selected=True)

  # -- uses ---------------------------------------------------------------

  def materialize(self):
    """The fused kernel, for uses other than a matrix product."""
    if self.group_scales:
      raise TypeError(
          f"'{self.path}' runs a different adapter per example, which only a"
          " matrix product against the kernel can do, but the function uses"
          " the kernel otherwise (or returns it); run one adapter at a time"
          " (jlora.select) for this function")
    letters = iter(string.ascii_letters)
    kl = [next(letters) for _ in self.roles]
    r = next(letters)
    al = "".join(l for l, x in zip(kl, self.roles) if x in "bi") + r
    bl = "".join(l for l, x in zip(kl, self.roles) if x in "bo") + r
    delta = jnp.einsum(f"{al},{bl}->{''.join(kl)}", self.a, self.b)
    delta = delta * jnp.asarray(self.scale, delta.dtype)
    w = base_array(self.w)
    fused = w + delta.astype(w.dtype)
    if self.gain is not None:
      fused = fused * self.gain.astype(fused.dtype)
    return fused

  def _plan(self, x, kernel_is_rhs: bool, params: dict) -> "_Plan":
    """einsum letters of ``dot_general(x, kernel)``'s factored form."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if kernel_is_rhs:
      xc, kc, xb, kb = lc, rc, lb, rb
    else:
      xc, kc, xb, kb = rc, lc, rb, lb
    xc, kc, xb, kb = (tuple(int(i) for i in t) for t in (xc, kc, xb, kb))
    if not self._check_contraction(kc, kb):
      return None
    letters = iter(string.ascii_letters)
    xl = [next(letters) for _ in range(x.ndim)]
    kl: list[str | None] = [None] * len(self.roles)
    for i, j in zip(xc + xb, kc + kb):
      kl[j] = xl[i]
    kl = [l if l is not None else next(letters) for l in kl]
    r = next(letters)
    al = [l for l, x_ in zip(kl, self.roles) if x_ in "bi"] + [r]
    bl = [l for l, x_ in zip(kl, self.roles) if x_ in "bo"] + [r]
    contracted = {kl[j] for j in kc}
    tl = [l for l in xl if l not in contracted]
    tl += [l for l in al[:-1] if l not in tl and l not in contracted] + [r]
    x_free = [xl[i] for i in range(x.ndim) if i not in xc and i not in xb]
    k_free = [kl[j] for j in range(len(kl)) if j not in kc and j not in kb]
    batch = [xl[i] for i in xb]
    out = batch + (x_free + k_free if kernel_is_rhs else k_free + x_free)
    free = tuple(i for i in range(x.ndim) if i not in xc and i not in xb)
    if not free and xb:
      # Without free axes of x, its first batch axis: the token axis that a
      # kernel gathered per token (w[expert_ids]) shares with x.
      free = (min(xb),)
    return _Plan(xl, kl, al, bl, tl, out, free)

  def shares_input_product(self, x, kernel_is_rhs: bool, params: dict):
    """The key under which kernels may share one ``x @ [a_1, a_2, ...]``.

    None when this kernel's adapter input is its own (dropout, per-example
    adapters).
    """
    if self.rng is not None:
      return None
    plan = self._plan(x, kernel_is_rhs, params)
    if plan is None:
      return None
    # Stacked adapters (one `jlora.wrap` call has one `adapter_ids`) share
    # with stacks of as many adapters.
    groups = len(self.group_scales)
    return (tuple(plan.xl), tuple(plan.al), tuple(plan.tl),
            tuple(self.a.shape[:-1]), jnp.dtype(self.w.dtype), groups)

  def dot_general(self, x, kernel_is_rhs: bool, params: dict, bind, t=None):
    """``dot_general(x, kernel)`` (or kernel, x) computed factored.

    `t`, when given, is this kernel's ``x @ a`` computed already (shared
    with other kernels that read the same `x`).
    """
    plan = self._plan(x, kernel_is_rhs, params)
    if plan is None:  # a layout mismatch, reported when the trace ends
      return self._base_product(x, kernel_is_rhs, bind)
    xl, kl, al, bl, tl, out = (plan.xl, plan.kl, plan.al, plan.bl, plan.tl,
                               plan.out)
    base = self._base_product(x, kernel_is_rhs, bind, params)

    dtype = self.w.dtype
    out_dtype = params.get("preferred_element_type") or base.dtype
    precision = params.get("precision")
    a, b, scale = self.a, self.b, jnp.asarray(self.scale, out_dtype)
    if self.group_scales:
      # Punica/S-LoRA's batched gather-matmul: each example's own (in, r)
      # and (r, out) factors are gathered and multiplied batch-wise.
      axis = self._example_axis(x, plan.free)
      ids = self._example_ids(x, axis)
      e = xl[axis]
      a = a if t is not None else self._gather(a, ids, al, e)
      b = self._gather(b, ids, bl, e)
      al, bl = _with_example(al, e), _with_example(bl, e)
      # Index n: -1, no adapter (scale 0); n + 1: out of range, NaN.
      scale = jnp.asarray(self.group_scales + (0.0, math.nan), out_dtype)[ids]
      scale = scale.reshape([-1 if l == e else 1 for l in tl])
    if t is None:
      xd, xdl = self._dropout(x, plan)
      t = jnp.einsum(f"{''.join(xdl)},{''.join(al)}->{''.join(tl)}",
                     xd, a.astype(dtype), precision=precision,
                     preferred_element_type=out_dtype)
    t = (t * scale).astype(dtype)
    delta = jnp.einsum(f"{''.join(tl)},{''.join(bl)}->{''.join(out)}", t,
                       b.astype(dtype), precision=precision,
                       preferred_element_type=out_dtype)
    y = base + delta.astype(base.dtype)
    if self.gain is not None:
      gl = [l for l, x_ in zip(kl, self.roles) if x_ != "i"]
      gain = jnp.squeeze(self.gain, [k for k, x_ in enumerate(self.roles)
                                     if x_ == "i"]).astype(y.dtype)
      y = jnp.einsum(f"{''.join(out)},{''.join(gl)}->{''.join(out)}", y, gain)
    return y

  def ragged_dot(self, x, group_sizes, dimension_numbers, params: dict,
                 bind, example_rows=None):
    """``ragged_dot_general(x, kernel, group_sizes)`` computed factored.

    The kernel's group axis is a stacked (expert) axis and the groups are
    runs of rows of `x` (tokens sorted by expert): ``ragged_dot(x, w) +
    scale * ragged_dot(ragged_dot(x, a), b)``, all with `group_sizes`, so
    each row meets its own expert's ``a`` (in, r) and ``b`` (r, out) only.

    Mixed-adapter batches need `example_rows`, the example of each row of a
    2-D `x`: the n adapters' ranks run side by side, and each row keeps its
    own adapter's block of ``x @ a`` (scaled) and zeros elsewhere.
    """
    (lc, rc), (lb, rb) = dimension_numbers.dot_dimension_numbers
    (g,) = dimension_numbers.rhs_group_dimensions
    (m,) = dimension_numbers.lhs_ragged_dimensions
    # The plain (M, K) x (G, K, N) form runs as a grouped GEMM on GPUs whose
    # XLA lowering would expand every group to dense (jlora._grouped_gemm).
    grouped = (self.roles == "bio" and not _fp8.is_fp8(self.w)
               and _grouped_gemm.is_plain(params, x.ndim, 3))
    product = bind
    if grouped:
      def product(x, w, out=params.get("preferred_element_type")):
        return _grouped_gemm.ragged_dot(
          x, w, group_sizes, precision=params.get("precision"),
          preferred_element_type=out)
    base = self._base_product(x, True, product)
    dtype = self.w.dtype
    out_dtype = params.get("preferred_element_type") or base.dtype
    options = dict(precision=params.get("precision"),
                   preferred_element_type=out_dtype,
                   group_offset=params.get("group_offset"))

    def axis_of(keep):  # kernel axis -> axis of the factor with those roles
      return {k: i for i, k in enumerate(
          k for k, r in enumerate(self.roles) if r in keep)}

    pa, pb = axis_of("bi"), axis_of("bo")
    first = jax.lax.RaggedDotDimensionNumbers(
        ((tuple(lc), tuple(pa[k] for k in rc)),
         (tuple(lb), tuple(pa[k] for k in rb))), [m], [pa[g]])
    if grouped:  # a: (G, K, r)
      t = product(self._dropout_rows(x), self.a.astype(dtype), out_dtype)
    else:
      t = jax.lax.ragged_dot_general(self._dropout_rows(x),
                                     self.a.astype(dtype), group_sizes, first,
                                     **options)
    scale = jnp.asarray(self.scale, out_dtype)
    if self.group_scales:
      scale = self._row_scales(example_rows, t.shape)
    # t: (*batch, *free rows of x, r); the ragged axis keeps its place.
    x_free = [d for d in range(x.ndim) if d not in lc and d not in lb]
    second = jax.lax.RaggedDotDimensionNumbers(
        (((t.ndim - 1,), (self.b.ndim - 1,)),
         (tuple(range(len(lb))), tuple(pb[k] for k in rb))),
        [len(lb) + x_free.index(m)], [pb[g]])
    t = (t * scale.astype(out_dtype)).astype(dtype)
    if grouped:  # b: (G, N, r)
      delta = product(t, jnp.swapaxes(self.b.astype(dtype), 1, 2),
                      out_dtype)
    else:
      delta = jax.lax.ragged_dot_general(t, self.b.astype(dtype),
                                         group_sizes, second, **options)
    y = base + delta.astype(base.dtype)
    if self.gain is not None:
      y = y * self._row_gain(x, group_sizes, dimension_numbers, params,
                             y.dtype)
    return y

  def _row_scales(self, example_rows, shape):
    """(rows, n * r): each row's adapter scale on its block, 0 elsewhere."""
    n = len(self.group_scales)
    if example_rows is None or len(shape) != 2:
      raise ValueError(
          f"'{self.path}' runs a different adapter per example under a"
          " ragged_dot, which needs a 2-D (rows, features) input whose rows"
          " are gathered from the tokens; run one adapter at a time"
          " (jlora.select) for this model")
    ids = self.ids.ids
    # -1: no adapter (scale 0); out of range (only under jit): NaN rows.
    ids = jnp.where(ids == -1, n, jnp.where((ids < -1) | (ids >= n), n + 1,
                                            ids))[example_rows]
    scales = jnp.asarray(self.group_scales + (0.0, math.nan),
                         jnp.float32)[ids]
    blocks = (jnp.arange(n) == ids[:, None]) * scales[:, None]
    return jnp.repeat(blocks, shape[1] // n, axis=1)

  def _row_gain(self, x, group_sizes, dimension_numbers, params, dtype):
    """DoRA's gain of each row's expert, broadcast against the output."""
    (lc, _), (lb, _) = dimension_numbers.dot_dimension_numbers
    (g,) = dimension_numbers.rhs_group_dimensions
    (m,) = dimension_numbers.lhs_ragged_dimensions
    if lb or group_sizes.ndim != 1 or params.get("group_offset") is not None:
      raise NotImplementedError(
          f"DoRA on '{self.path}' under a ragged_dot with batch axes or a"
          " group offset; use a plain ragged_dot(x, w, group_sizes)")
    inputs = [k for k, r in enumerate(self.roles) if r == "i"]
    gain = jnp.squeeze(self.gain, inputs)  # (*kernel axes but inputs)
    gain = jnp.moveaxis(gain, [k for k in range(len(self.roles))
                               if k not in inputs].index(g), 0)
    rows = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes,
                      total_repeat_length=x.shape[m])
    x_free = [d for d in range(x.ndim) if d not in lc]
    shape = [x.shape[d] if d == m else 1 for d in x_free]
    return gain[rows].reshape(*shape, *gain.shape[1:]).astype(dtype)

  def _example_axis(self, x, free: tuple) -> int:
    """The axis of `x` along which examples run their own adapters.

    ``adapter_ids_axis`` when given; else the one uncontracted axis of size
    B (the number of ids), or failing that the one whose size is a multiple
    of B (a batch-major flattened (B * T, features) input). Two candidates
    are ambiguous, e.g. a (B, T, F) input with T == B: then it raises.
    """
    batch, axis, shape = self.ids.ids.shape[0], self.ids.axis, tuple(x.shape)
    where = (f"the input of the product with '{self.path}' has shape {shape}"
             f" (uncontracted axes {list(free)})")
    if axis is not None:
      k = axis + x.ndim if axis < 0 else axis
      if k not in free or shape[k] % batch:
        raise ValueError(
            f"adapter_ids_axis={axis}, but {where}: the axis must be an"
            f" uncontracted axis of size {batch} (the number of adapter_ids)"
            f" or a multiple of it (a batch-major flattened batch)")
      return k
    exact = [k for k in free if shape[k] == batch]
    found = exact or [k for k in free if shape[k] % batch == 0]
    if len(found) == 1 or (found and batch == 1):
      return found[0]  # with one example any axis gives the same result
    if not found:
      raise ValueError(
          f"adapter_ids has {batch} entries, but {where}: no uncontracted"
          f" axis has size {batch} (or a multiple of it); pass the batch's"
          " adapter_ids, or name the batch axis with adapter_ids_axis=k")
    raise ValueError(
        f"adapter_ids has {batch} entries and {where}: axes {found} could"
        " each be the batch axis. Name it: jlora.wrap(fn)(...,"
        " adapter_ids=ids, adapter_ids_axis=k), k the batch axis of the"
        " products' inputs (negative counts from the end, e.g. -2 for"
        " (..., batch, features))")

  def _example_ids(self, x, axis: int):
    """Each row's adapter index along x's `axis`, n for no adapter.

    A flattened (batch * seq, features) input repeats each id. Ids out of
    -1..n-1 (possible only under jit, where values are unknown while
    tracing) map to n + 1, whose scale is NaN: their examples' outputs are
    NaN, never silently the base's.
    """
    n = len(self.group_scales)
    ids = self.ids.ids
    size, batch = x.shape[axis], ids.shape[0]
    ids = ids if size == batch else jnp.repeat(ids, size // batch)
    # -1 runs no adapter: it indexes past the end, filled with 0.
    return jnp.where(ids == -1, n, jnp.where((ids < -1) | (ids >= n), n + 1,
                                             ids))

  def _gather(self, factor, ids, letters=(), e=None):
    """(..., n * r) -> (..., E, r): each example's own adapter's factor.

    A factor that has the example axis already (`e` among its einsum
    `letters`: a kernel gathered per token, ``w[expert_ids]``) keeps it and
    takes each row's own adapter: (..., E, ..., n * r) -> (..., E, ..., r).
    """
    n = len(self.group_scales)
    factor = factor.reshape(*factor.shape[:-1], n, factor.shape[-1] // n)
    if e in letters[:-1]:
      # Rows without an adapter (id n) get a scale of 0: any block will do.
      shape = [1] * factor.ndim
      shape[list(letters).index(e)] = -1
      rows = jnp.minimum(ids, n - 1).reshape(shape)
      return jnp.take_along_axis(factor, rows, axis=-2)[..., 0, :]
    return jnp.take(factor, ids, axis=-2, mode="fill", fill_value=0)

  def _base_product(self, x, kernel_is_rhs: bool, bind, params=None):
    """``dot_general(x, w)``, dequantizing a quantized ``w`` for this use."""
    if _fp8.is_fp8(self.w):  # FP8 base: an FP8 product where it can
      if params is None:  # a grouped (ragged) product: no FP8 GEMM for it
        return _fp8.upcast_product(x, self.w, kernel_is_rhs, bind)
      return _fp8.dot_general(x, self.w, kernel_is_rhs, params, bind)
    if not is_quantized(self.w):
      return bind(*((x, self.w) if kernel_is_rhs else (self.w, x)))

    def product(x, w):
      dense = w.dequantize()
      return bind(*((x, dense) if kernel_is_rhs else (dense, x)))

    if not any(isinstance(v, jax.core.Tracer) for v in (x, self.w.codes)):
      return product(x, self.w)  # eager: nothing is differentiated

    # Saving nothing makes the backward pass dequantize again from the codes
    # instead of keeping the dense kernel (per layer of a scan: the whole
    # stack) alive from the forward pass.
    return jax.checkpoint(product,
                          policy=jax.checkpoint_policies.nothing_saveable)(
                              x, self.w)

  def _dropout_rows(self, x):
    """The ragged product's input masked: one mask over its rows, drawn
    from the first expert's key (the rows meet their experts only inside
    the grouped product)."""
    if self.rng is None:
      return x
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(self.w.dtype)
    key = self.rng if self.rng.ndim == 0 else self.rng.reshape(-1)[0]
    keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

  def _dropout(self, x, plan: "_Plan"):
    """(dropped x, its einsum letters): the adapter path's input masked.

    Each stacked index ``l`` of the kernel draws its own mask from its own
    key ``rng[l]`` over the input's other axes, as one layer of a scan over
    the stack does. A stacked axis that `x` lacks (one input, one product
    per layer) is added to the dropped input.
    """
    if self.rng is None:
      return x, plan.xl
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(self.w.dtype)  # 1 / (1 - p) must not truncate
    sl = [l for l, r in zip(plan.kl, self.roles) if r == "b"]
    rest = [l for l in plan.xl if l not in sl]
    draw = lambda key: jax.random.bernoulli(
        key, 1.0 - self.dropout, [x.shape[plan.xl.index(l)] for l in rest])
    for _ in sl:
      draw = jax.vmap(draw)
    keys = self.rng
    if self.selected and keys.ndim:
      # Experts gathered per row (w[expert_ids]) repeat their keys; folding in
      # the row's position keeps rows that share an expert independent.
      flat = keys.reshape(-1)
      keys = jax.vmap(jax.random.fold_in)(
          flat, jnp.arange(flat.shape[0], dtype=jnp.uint32)).reshape(keys.shape)
    keep = draw(keys)  # letters sl + rest
    letters = plan.xl + [l for l in sl if l not in plan.xl]
    keep = jnp.transpose(keep, [(sl + rest).index(l) for l in letters])
    x = x.reshape(*x.shape, *[1] * (len(letters) - x.ndim))
    return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype), letters

  def _check_contraction(self, kc, kb) -> bool:
    """False (the mismatch recorded, or raised outside `wrap`) if the
    product contracts other axes than the layout's inputs."""
    inputs = {k for k, r in enumerate(self.roles) if r == "i"}
    kept = [k for k in range(len(self.roles)) if k not in kc and k not in kb]
    # A stacked axis the product keeps (gemma's heads read as 'bio') would
    # silently be one adapter per head: it is an output axis.
    kept_stacked = [k for k in kept if self.roles[k] == "b"
                    and self.w.shape[k] != 1 and not self.selected]
    if set(kc) == inputs and not any(self.roles[k] == "o" for k in kb) and (
        not kept_stacked):
      return True
    # Name the layout that would fit, in the kernel's original axis order:
    # a stacked axis this view no longer has (scanned over) stays stacked.
    suggested = ["b" if r == "b" else "o" for r in self.layout]
    for k, o in enumerate(self.orig):
      if o >= 0:
        suggested[o] = "i" if k in kc else "b" if k in kb else "o"
    found = _Mismatch(self.path, self.layout,
                      tuple(sorted(self.orig[k] for k in kc)),
                      tuple(sorted(self.orig[k] for k in kept)),
                      "".join(suggested))
    pending = _MISMATCHES.get()
    if pending is None:
      raise LayoutError(_layout_message([found]))
    if found not in pending:
      pending.append(found)
    return False


def _with_example(letters: list, e: str) -> list:
  """A factor's einsum letters once each example's adapter is taken."""
  return letters if e in letters[:-1] else letters[:-1] + [e, letters[-1]]


class _Plan(NamedTuple):
  xl: list
  kl: list
  al: list
  bl: list
  tl: list
  out: list
  free: tuple  # x's axes neither contracted nor batch axes of the product


def shared_input_products(kernels, x, kernel_is_rhs: bool, params: dict):
  """``x @ a_k`` of several kernels reading the same `x`, as one matmul.

  Kernels whose adapters read one input (q/k/v projections, gate/up) have
  their ``a`` factors concatenated along the rank axis, so `x` is read once
  and the backward pass forms one ``x^T @ dt`` and one ``dt @ a^T`` instead
  of one per kernel. Returns each kernel's ``t`` for `Factored.dot_general`.
  """
  first = kernels[0]
  plan = first._plan(x, kernel_is_rhs, params)
  dtype = first.w.dtype
  out_dtype = params.get("preferred_element_type") or jnp.result_type(
      x.dtype, dtype)
  al = plan.al
  if first.group_scales:  # each kernel's per-example factors, gathered
    axis = first._example_axis(x, plan.free)
    ids = first._example_ids(x, axis)  # one adapter_ids per call
    e = plan.xl[axis]
    factors = [k._gather(k.a, ids, al, e) for k in kernels]
    al = _with_example(al, e)
  else:
    factors = [k.a for k in kernels]
  a = jnp.concatenate([f.astype(dtype) for f in factors], axis=-1)
  t = jnp.einsum(f"{''.join(plan.xl)},{''.join(al)}->{''.join(plan.tl)}",
                 x, a, precision=params.get("precision"),
                 preferred_element_type=out_dtype)
  splits = list(itertools.accumulate(f.shape[-1] for f in factors))[:-1]
  return jnp.split(t, splits, axis=-1)


def _dora_gain(node: LoRA, w, a, b):
  """DoRA's ``m / ||W'||`` per output column, the norm taken factored.

  With ``W' = w + s * A B`` and ``c`` a column (one output, one stacked
  index): ``||W'_c||^2 = ||w_c||^2 + 2 s (w^T A)_c . B_c + s^2 B_c^T (A^T A)
  B_c``, so only products against ``w`` and (r, r) Gram matrices are
  formed, never ``A B``. `a`, `b`: the factors in `Factored` order.
  """
  roles = node.layout
  acc = jnp.promote_types(w.dtype, jnp.float32)
  dense = base_array(w).astype(acc)
  a, b = a.astype(acc), b.astype(acc)
  kl = string.ascii_letters[:len(roles)]
  r, q = string.ascii_letters[len(roles):len(roles) + 2]
  pick = lambda keep: "".join(l for l, x in zip(kl, roles) if x in keep)
  al, bl, cl, sl = pick("bi") + r, pick("bo") + r, pick("bo"), pick("b")
  exact = jax.lax.Precision.HIGHEST
  squares = jnp.einsum(f"{kl}->{cl}", dense * dense)
  wa = jnp.einsum(f"{kl},{al}->{cl}{r}", dense, a, precision=exact)
  cross = jnp.einsum(f"{cl}{r},{bl}->{cl}", wa, b, precision=exact)
  gram = jnp.einsum(f"{al},{al[:-1]}{q}->{sl}{r}{q}", a, a, precision=exact)
  quad = jnp.einsum(f"{bl},{sl}{r}{q},{bl[:-1]}{q}->{cl}", b, gram, b,
                    precision=exact)
  s = node.scale
  norm = jnp.sqrt(jnp.maximum(squares + 2 * s * cross + s * s * quad, 0))
  norm = jax.lax.stop_gradient(jnp.expand_dims(
      norm, [k for k, x in enumerate(roles) if x == "i"]))
  m = _to_kernel_layout(node.m[..., None, :].astype(jnp.float32), roles,
                        tuple(norm.shape))
  return (m / norm).astype(acc)


def _transpose(w, perm):
  if is_quantized(w):
    return w.transpose(perm)  # dequantizes unless perm is the identity
  return jnp.transpose(w, perm)
