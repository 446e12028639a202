"""What a LoRA kernel becomes when a model selects experts from it.

A Mixture-of-Experts layer keeps its experts' weights stacked, (E, in, out)
with layout ``"bio"`` (``"bbio"`` under a scan over layers), and picks
experts with one of these primitives; each rule here keeps the kernel
factored, applying the same selection to every array that follows the
kernel's axes (``w``, ``a``, ``b``, DoRA's gain, the dropout keys):

================================  ==========================================
what the model writes             primitives (JAX 0.10 and 0.11)
================================  ==========================================
``w[2]``, ``w[1:3]``              ``slice`` (+ ``squeeze``)
``w[i]`` with a traced ``i``,     ``dynamic_slice`` + ``squeeze``
``lax.dynamic_index_in_dim``      (inside a ``jit``)
``w[ids]``, ``jnp.take(w, ids)``  ``gather`` (``jnp.take``: inside a ``jit``)
``lax.ragged_dot(x, w, sizes)``   ``ragged_dot_general``
``einsum("eci,eio->eco")``        ``dot_general`` with batch axes (no rule
                                  needed: `Factored.dot_general`)
================================  ==========================================

A quantized base is selected on its stored codes and scales when the
selected axes are among its leading stacked axes (blocks never cross them),
so only the chosen experts are ever dequantized; otherwise it is
dequantized first. A selection that indexes an input or output axis of a
kernel that has stacked axes means its layout was misread: `LayoutError`
names the layout to use.

``ragged_dot`` (a grouped GEMM over tokens sorted by expert) becomes
``ragged_dot(x, w) + s * ragged_dot(ragged_dot(x, a), b)`` with the same
group sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from jlora._factored import Factored, LayoutError
from jlora._fp8_kernel import Fp8Kernel
from jlora._quant_array import is_quantized
from jlora.node import base_array


def _bind(eqn, invals):
  from jlora._interpreter import bind  # the interpreter imports this module
  return bind(eqn, invals)


def _fuse(eqn, invals):
  return _bind(eqn, [x.materialize() if isinstance(x, Factored) else x
                     for x in invals])


# -- selections: one per primitive, applied to every aligned array ------------
#
# An aligned array's axis map gives, for each of its axes, the kernel axis it
# follows or None (an axis of its own, always trailing: the rank axis, key
# data, a quantized base's blocks). Broadcast axes have size 1 whatever the
# kernel's (DoRA's gain on the input axes) and are never cut.


@dataclasses.dataclass(frozen=True)
class _Slice:
  """``lax.slice`` (static starts, limits, strides), or ``dynamic_slice``."""
  starts: tuple
  sizes: tuple[int, ...]
  strides: tuple[int, ...] | None = None
  dynamic: bool = False

  def touched(self, shape) -> set[int]:
    return {k for k, (s, n) in enumerate(zip(self.starts, self.sizes))
            if n != shape[k] or (not self.dynamic and s != 0)
            or (self.strides and self.strides[k] != 1)}

  def removed(self) -> set[int]:
    return set()

  def on(self, x, amap, bcast):
    starts, sizes, strides = [], [], []
    for d, k in enumerate(amap):
      if k is None or k in bcast:
        starts.append(0)
        sizes.append(x.shape[d])
        strides.append(1)
      else:
        starts.append(self.starts[k])
        sizes.append(self.sizes[k])
        strides.append(self.strides[k] if self.strides else 1)
    if self.dynamic:
      return lax.dynamic_slice(x, starts, sizes), amap
    limits = [s + (n - 1) * st + 1 if n else s
              for s, n, st in zip(starts, sizes, strides)]
    return lax.slice(x, starts, limits, strides), amap

  def roles(self, roles, orig):
    return roles, orig


@dataclasses.dataclass(frozen=True)
class _Squeeze:
  dims: tuple[int, ...]

  def touched(self, shape) -> set[int]:
    return set(self.dims)

  def removed(self) -> set[int]:
    return set(self.dims)

  def on(self, x, amap, bcast):
    drop = [d for d, k in enumerate(amap) if k in self.dims]
    new = tuple(None if k is None else k - sum(j < k for j in self.dims)
                for d, k in enumerate(amap) if d not in drop)
    return lax.squeeze(x, drop), new

  def roles(self, roles, orig):
    keep = [k for k in range(len(roles)) if k not in self.dims]
    return "".join(roles[k] for k in keep), tuple(orig[k] for k in keep)


@dataclasses.dataclass(frozen=True)
class _Gather:
  """``lax.gather`` of index arrays along stacked axes (``w[ids]``)."""
  indices: Any
  dnums: Any
  slice_sizes: tuple[int, ...]
  params: dict

  @property
  def out_rank(self) -> int:
    return self.indices.ndim - 1 + len(self.dnums.offset_dims)

  def _offset_axes(self, ndim: int) -> list[int]:
    """Kernel axes that the output keeps, in the order of offset_dims."""
    gone = set(self.dnums.collapsed_slice_dims) | set(
        self.dnums.operand_batching_dims)
    return [k for k in range(ndim) if k not in gone]

  def touched(self, shape) -> set[int]:
    return (set(self.dnums.start_index_map) |
            set(self.dnums.collapsed_slice_dims) |
            set(self.dnums.operand_batching_dims) |
            {k for k, n in enumerate(self.slice_sizes) if n != shape[k]})

  def removed(self) -> set[int]:
    return set()

  def on(self, x, amap, bcast):
    ndim = len(self.slice_sizes)
    pos = {k: d for d, k in enumerate(amap) if k is not None}
    source = dict(zip(self.dnums.offset_dims, self._offset_axes(ndim)))
    # The array's output: the kernel output's positions it follows (every
    # index position, the kept axes it carries), then its own axes.
    carried = [p for p in range(self.out_rank)
               if p not in source or source[p] in pos]
    own = [d for d, k in enumerate(amap) if k is None]
    offset = [i for i, p in enumerate(carried) if p in source]
    offset += list(range(len(carried), len(carried) + len(own)))
    sizes = [x.shape[d] if k is None or k in bcast else self.slice_sizes[k]
             for d, k in enumerate(amap)]
    dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(offset),
        collapsed_slice_dims=tuple(pos[k] for k in
                                   self.dnums.collapsed_slice_dims),
        start_index_map=tuple(pos[k] for k in self.dnums.start_index_map),
        operand_batching_dims=tuple(pos[k] for k in
                                    self.dnums.operand_batching_dims),
        start_indices_batching_dims=tuple(
            self.dnums.start_indices_batching_dims))
    params = dict(self.params)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      params["fill_value"] = None  # NaN fills (jnp.take) are for floats
    y = lax.gather(x, self.indices, dn, sizes, **params)
    return y, tuple(carried) + (None,) * len(own)

  def roles(self, roles, orig):
    source = dict(zip(self.dnums.offset_dims, self._offset_axes(len(roles))))
    picked = self.dnums.start_index_map[0] if self.dnums.start_index_map else 0
    new_roles = "".join(roles[source[p]] if p in source else "b"
                        for p in range(self.out_rank))
    new_orig = tuple(orig[source[p]] if p in source else orig[picked]
                     for p in range(self.out_rank))
    return new_roles, new_orig


# -- applying a selection to a kernel ------------------------------------------


def _key_data(rng):
  """(data, impl): typed keys as plain arrays (key data trails the axes)."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng), jax.random.key_impl(rng)
  return rng, None


def _select_quantized(w, op):
  """The selection on a quantized base's stored arrays, or None if it
  touches axes that its blocks span."""
  k = w.stacked
  if not op.touched(w.shape) <= set(range(k)):
    return None
  amap = tuple(range(k))
  stored = {}
  for field in dataclasses.fields(w):
    if field.metadata.get("static"):
      continue
    name, x = field.name, getattr(w, field.name)
    if x is None:
      continue
    y, new = op.on(x, amap + (None,) * (x.ndim - k), frozenset())
    stored[name] = y
  new_stacked = [a for a in new if a is not None]
  if new_stacked != list(range(len(new_stacked))):
    return None  # kept axes would land among the blocks' axes
  return dataclasses.replace(w, **stored)


def _apply(kernel: Factored, op) -> Factored:
  """`kernel` with `op` applied to each array that follows its axes."""
  roles, orig = op.roles(kernel.roles, kernel.orig)
  arrays = {}
  for name, (x, amap, bcast) in kernel.aligned().items():
    if x is None:
      continue
    if name == "w" and is_quantized(x):
      q = _select_quantized(x, op)
      if q is not None:
        arrays[name] = q
        continue
      x = base_array(x)  # blocks span the selected axes: select dense
    if name == "rng":
      data, impl = _key_data(x)
      y, _ = op.on(data, amap + (None,) * (data.ndim - len(amap)), bcast)
      arrays[name] = y if impl is None else jax.random.wrap_key_data(
          y, impl=impl)
      continue
    arrays[name], _ = op.on(x, amap, bcast)
  return kernel.with_selection(arrays, roles, orig)


def _misread(kernel: Factored, axes: set[int], what: str):
  """A LayoutError for a selection of the kernel's input/output axes."""
  k = min(axes, key=lambda j: (kernel.roles[j] == "b", j))
  role = {"i": "an input", "o": "an output"}[kernel.roles[k]]
  suggested = list(kernel.layout)
  stacked = [kernel.orig[j] for j, r in enumerate(kernel.roles)
             if r == "b" and kernel.orig[j] >= 0]
  stacked = stacked or [j for j, r in enumerate(kernel.layout) if r == "b"]
  if kernel.orig[k] >= 0 and stacked:
    # The usual slip: the stacked (expert) axis is elsewhere than the layout
    # says; the indexed axis and the layout's stacked axis trade roles.
    j, i = stacked[0], kernel.orig[k]
    suggested[i], suggested[j] = suggested[j], suggested[i]
  suggestion = "".join(suggested)
  return LayoutError(
      f"LoRA kernel '{kernel.path}' (layout '{kernel.layout}') is {what}"
      f" along its axis {kernel.orig[k]}, which the layout calls {role}"
      f" axis; experts (or other stacked slices) must be selected along a"
      f" 'b' axis. Re-create the adapter with jlora.apply(...,"
      f" layout={{{kernel.path!r}: {suggestion!r}}}).")


def _select_rule(make_op, what: str):
  """A rule that applies a selection, or fuses if the kernel cannot keep it."""

  def rule(eqn, invals, share=True):
    kernel = invals[0]
    if not isinstance(kernel, Factored) or any(
        isinstance(x, Factored) for x in invals[1:]):
      return _fuse(eqn, invals)
    op = make_op(eqn, invals)
    if op is None:
      return _fuse(eqn, invals)
    if isinstance(kernel, Fp8Kernel):
      # No adapter, so no layout to keep: a selection of stacked axes keeps
      # the FP8 form, any other (an embedding lookup) sees the dense kernel.
      q = _select_quantized(kernel.w, op)
      return _fuse(eqn, invals) if q is None else [Fp8Kernel(q)]
    touched = op.touched(tuple(kernel.w.shape))
    # Cutting input or output axes keeps the factors (a slice of w + a @ b
    # is a slice of a or of b); selecting single entries of them does not
    # leave a matrix.
    picked = {k for k in touched if kernel.roles[k] != "b"}
    if isinstance(op, _Slice):
      picked = set()
    elif isinstance(op, _Squeeze):
      picked = {k for k in picked if _last_of_role(kernel, k, op)}
    if picked:
      if "b" in kernel.roles:
        raise _misread(kernel, picked, what)
      return _fuse(eqn, invals)  # e.g. an embedding lookup of an (in, out)
    return [_apply(kernel, op)]

  return rule


def _last_of_role(kernel, k, op) -> bool:
  role = kernel.roles[k]
  return all(kernel.roles[j] != role or j in op.removed()
             for j in range(len(kernel.roles)))


def _slice_op(eqn, invals):
  p = eqn.params
  start = tuple(int(s) for s in p["start_indices"])
  limit = tuple(int(s) for s in p["limit_indices"])
  strides = tuple(int(s) for s in p["strides"]) if p.get("strides") else None
  sizes = tuple(len(range(s, l, st)) for s, l, st in
                zip(start, limit, strides or (1,) * len(start)))
  return _Slice(start, sizes, strides)


def _dynamic_slice_op(eqn, invals):
  ndim = len(eqn.params["slice_sizes"])
  if len(invals) != 1 + ndim:
    return None  # dynamic sizes (dynamic shapes): the fused kernel
  return _Slice(tuple(invals[1:]), tuple(eqn.params["slice_sizes"]),
                dynamic=True)


def _squeeze_op(eqn, invals):
  ndim = len(invals[0].roles)
  return _Squeeze(tuple(sorted(int(d) % ndim
                               for d in eqn.params["dimensions"])))


def _gather_op(eqn, invals):
  p = dict(eqn.params)
  dnums, sizes = p.pop("dimension_numbers"), tuple(p.pop("slice_sizes"))
  return _Gather(invals[1], dnums, sizes, p)


# -- ragged_dot: a grouped GEMM over tokens sorted by expert -------------------


def _ragged_rule(eqn, invals, share=True):
  lhs, rhs, group_sizes = invals
  if (not isinstance(rhs, Factored) or isinstance(lhs, Factored)
      or isinstance(group_sizes, Factored)):
    return _fuse(eqn, invals)
  p = eqn.params
  rdn = p["ragged_dot_dimension_numbers"]
  bind = lambda x, w: _bind(eqn, [x, w, group_sizes])[0]
  if isinstance(rhs, Fp8Kernel):  # no adapter, so no layout to keep
    return [rhs.ragged_dot(lhs, group_sizes, rdn, p, bind)]
  (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
  groups = tuple(rdn.rhs_group_dimensions)
  (ragged,) = rdn.lhs_ragged_dimensions
  if ragged in lc or ragged in lb or len(groups) != 1:
    # Ragged contracting or batch axes: the kernel is not grouped by expert.
    return _fuse(eqn, invals)
  kernel = rhs
  kernel._check_contraction(tuple(rc), tuple(rb) + groups)
  free = [k for k in range(len(kernel.roles))
          if k not in rc and k not in rb and k not in groups]
  if any(kernel.roles[k] != "o" for k in free):
    return _fuse(eqn, invals)
  rows = None
  if kernel.group_scales:
    rows = _example_rows(eqn.invars[0], lhs, kernel)
  return [kernel.ragged_dot(lhs, group_sizes, rdn, p, bind,
                            example_rows=rows)]


# -- which example each sorted row comes from (mixed-adapter batches) ----------
#
# A sorted dispatch gathers token rows into expert order before its
# ragged_dot (x_sorted = x_flat[order // k]). Walking back from the
# ragged_dot's input through such data movement to the token array, then
# replaying those steps on the token array's row numbers, gives each sorted
# row's token and so its example.

# Ops whose output row i comes from row i of one input (the activations
# between a gather and the ragged_dots of an expert MLP).
_ROWWISE = frozenset({
    "convert_element_type", "copy", "copy_p", "reduce_precision", "neg",
    "add", "add_any", "sub", "mul", "div", "max", "min", "exp", "log",
    "log1p", "expm1", "logistic", "tanh", "erf", "sqrt", "rsqrt", "abs",
    "sign", "integer_pow", "pow", "square", "sin", "cos", "select_n",
    "stop_gradient",
    "name"})  # checkpoint_name's identity
_MOVE = frozenset({"reshape", "squeeze", "expand_dims"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call",
                    "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2",
                    prims.jit_p.name, prims.remat_p.name})
# Calls whose inner jaxpr takes the equation's inputs as they are.
_SAME_INPUTS = frozenset({"jit", "pjit", "closed_call", "core_call",
                          "checkpoint", "remat", "remat2", prims.jit_p.name,
                          prims.remat_p.name})


def _inner(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      jaxpr = eqn.params[key]
      return getattr(jaxpr, "jaxpr", jaxpr), getattr(jaxpr, "consts", ())
  return None, ()


def _data_input(eqn):
  """(input, moves) if output row i comes from a row of that input, moved
  (``moves``: a gather, a reshape) or in place (elementwise, products)."""
  name = eqn.primitive.name
  out = eqn.outvars[0].aval
  if name in _ROWWISE:
    same = [j for j, v in enumerate(eqn.invars)
            if getattr(v, "aval", None) is not None
            and not isinstance(v, jax.extend.core.Literal)
            and tuple(v.aval.shape) == tuple(out.shape)]
    floats = [j for j in same
              if jnp.issubdtype(eqn.invars[j].aval.dtype, jnp.inexact)]
    return ((floats or same)[0], False) if same else None
  if name in _MOVE:
    return 0, True
  # Columns cut off each row (a fused gate_up split into gate and up).
  if name == "split" and eqn.params["axis"] != 0:
    return 0, False
  if name == "slice":
    p, n = eqn.params, eqn.invars[0].aval.shape[0]
    if (p["start_indices"][0] == 0 and p["limit_indices"][0] == n
        and (not p.get("strides") or p["strides"][0] == 1)):
      return 0, False
    return None
  if name == "gather":
    dn = eqn.params["dimension_numbers"]
    if tuple(dn.start_index_map) == (0,) and not dn.operand_batching_dims:
      return 0, True
    return None
  if name in ("dot_general", "ragged_dot_general"):
    dn = eqn.params.get("dimension_numbers")
    if dn is None:
      rdn = eqn.params["ragged_dot_dimension_numbers"]
      dn = rdn.dot_dimension_numbers
      if tuple(rdn.lhs_ragged_dimensions) != (0,):
        return None
    (lc, _), (lb, _) = dn
    return (0, False) if 0 not in lc and not lb else None
  if name in _CALLS and len(eqn.outvars) == 1:
    inner, _ = _inner(eqn)
    if inner is None:
      return None
    source, chain = _row_source(inner.outvars[0], inner)
    if chain and source in inner.invars:
      moves = any(m for _, _, m in chain)
      if moves and name not in _SAME_INPUTS:
        return None
      return inner.invars.index(source), moves
  return None


def _row_source(var, jaxpr, batch=None, sorted_=False):
  """(source var, [(eqn, input, moves)...]) of the rows ending at var.

  With `batch`, the walk stops at the token array once a gather has picked
  the rows (``sorted_``): at an array whose leading axis is the batch
  (hidden states (B, T, ...)), and before a second gather (the embedding
  lookup that made the tokens, whose rows are vocabulary entries).
  """
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}
  chain = []
  while var in producer and len(chain) < 64:
    if sorted_ and _is_batch(var, batch):
      break
    eqn = producer[var]
    step = _data_input(eqn)
    if step is None:
      break
    picks = _gathers([(eqn, *step)])
    if batch is not None and sorted_ and picks:
      break
    chain.append((eqn, *step))
    sorted_ = sorted_ or picks
    var = eqn.invars[step[0]]
  return var, chain


def _is_batch(var, batch) -> bool:
  shape = getattr(getattr(var, "aval", None), "shape", ())
  return batch is not None and len(shape) > 1 and shape[0] == batch


def _rows(value, shape):
  """Row numbers of `value` (constant along each row), broadcast to shape."""
  rows = value.reshape(value.shape[0], -1)[:, 0]
  return jnp.broadcast_to(rows.reshape(-1, *[1] * (len(shape) - 1)), shape)


def _replay(chain, value, read):
  """The chain's row movement applied to `value` (other inputs: `read`)."""
  for eqn, j, moves in reversed(chain):
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if not moves:
      value = _rows(value, out_shape)
      continue
    invals = [value if k == j else read(v) for k, v in enumerate(eqn.invars)]
    if eqn.primitive.name in _CALLS:
      inner, consts = _inner(eqn)
      env = dict(zip(inner.constvars, consts))
      env.update(zip(inner.invars, invals))
      source, sub = _row_source(inner.outvars[0], inner)

      def sub_read(v, env=env, inner=inner):
        if isinstance(v, jax.extend.core.Literal):
          return v.val
        if v not in env:  # an index computed inside the call
          env[v] = _eval_var(v, inner, env)
        return env[v]

      value = _replay(sub, env[source], sub_read)
    else:
      value = _bind(eqn, invals)[0]
  return value


def _eval_var(var, jaxpr, env):
  """`var` of `jaxpr` computed from `env` (plain values only)."""
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}
  eqn = producer[var]
  invals = []
  for v in eqn.invars:
    if isinstance(v, jax.extend.core.Literal):
      invals.append(v.val)
    else:
      if v not in env:
        env[v] = _eval_var(v, jaxpr, env)
      invals.append(env[v])
  for v, x in zip(eqn.outvars, _bind(eqn, invals)):
    env[v] = x
  return env[var]


def _example_rows(lhs_var, lhs, kernel):
  """The example of each row of a ragged_dot's input, (rows,) int32."""
  from jlora._interpreter import current_frame
  batch = kernel.ids.ids.shape[0]
  numbers, tokens, moved = _row_numbers(lhs_var, current_frame(), batch)
  if lhs.ndim != 2 or not moved or tokens % batch:
    found = (f"come from an array of {tokens} rows" if moved else
             "are not gathered from the tokens")
    raise ValueError(
        f"adapter_ids has {batch} entries, but the rows of the ragged_dot"
        f" with '{kernel.path}' {found}, so their examples are unknown;"
        " sort tokens with a gather of the (batch * sequence, features)"
        " array (x_flat[order]) before the ragged_dot, or run one adapter"
        " at a time (jlora.select)")
  return jnp.round(numbers).astype(jnp.int32) // (tokens // batch)


def _row_numbers(var, frame, batch, sorted_=False):
  """(row of the token array that each row of `var` comes from, tokens,
  whether a gather picked the rows on the way).

  Follows the rows into the calls around `frame` (a checkpointed expert
  block fed sorted tokens from outside), and stops at the token array (see
  `_row_source`).
  """
  if frame is None or isinstance(var, jax.extend.core.Literal):
    return None, None, False
  source, chain = _row_source(var, frame.jaxpr, batch, sorted_)
  sorted_ = sorted_ or _gathers(chain)
  start, tokens, moved = None, None, False
  parent = frame.parent
  if (source in frame.jaxpr.invars and parent is not None
      and not (sorted_ and _is_batch(source, batch))
      and parent.eqn.primitive.name in _SAME_INPUTS
      and len(parent.eqn.invars) == len(frame.jaxpr.invars)):
    outer = parent.eqn.invars[frame.jaxpr.invars.index(source)]
    start, tokens, moved = _row_numbers(outer, parent, batch, sorted_)
  if start is None:
    tokens = source.aval.shape[0]
    start = lax.broadcasted_iota(jnp.float32, source.aval.shape, 0)
  else:
    start = _rows(start, tuple(source.aval.shape))
  rows = _replay(chain, start, frame.read)
  return rows.reshape(rows.shape[0], -1)[:, 0], tokens, moved or _gathers(
      chain)


def _gathers(chain) -> bool:
  """Whether a chain of row steps picks rows with a gather (sorts them)."""
  for eqn, _, moves in chain:
    if eqn.primitive.name == "gather":
      return True
    if moves and eqn.primitive.name in _CALLS:
      inner, _ = _inner(eqn)
      if _gathers(_row_source(inner.outvars[0], inner)[1]):
        return True
  return False


RULES = {
    "slice": _select_rule(_slice_op, "sliced"),
    "squeeze": _select_rule(_squeeze_op, "indexed"),
    "dynamic_slice": _select_rule(_dynamic_slice_op, "indexed"),
    "gather": _select_rule(_gather_op, "gathered"),
    "ragged_dot_general": _ragged_rule,
}
