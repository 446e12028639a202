"""Walks a jaxpr to find how each parameter leaf enters matrix products.

A parameter leaf is followed through ops that only re-lay it out
(transpose, reshape, squeeze, cast, slice, a row gather) and into calls
(`jit`, `checkpoint`, `custom_jvp`/`custom_vjp`, `cond`, `while`, `scan`,
`shard_map`). At each `dot_general` it meets, its axes get roles: contracted
'i', batch 'b', kept 'o'; an axis it lost on the way (indexed away, scanned
over) is 'b'. A gather whose rows are not then batched as a stacked axis
records the leaf as an embedding table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from jax.extend import core as jex_core

try:  # source lines only make error messages better
  from jax.extend import source_info_util
except ImportError:  # pragma: no cover
  source_info_util = None

from jlora._shapes import reshape_groups
from jlora._interpreter import _closed, _scan_layout

_Literal = jex_core.Literal

# Ops whose output is their (first) input, laid out the same.
_SAME = frozenset({"convert_element_type", "copy", "copy_p",
                   "sharding_constraint", "reduce_precision", "slice",
                   "dynamic_slice", "mesh_cast", "reshard", "pvary"})


@dataclasses.dataclass(frozen=True)
class View:
  """A value made from parameter leaf `leaf` by layout ops.

  `axes[k]` holds the leaf's axes that make up the value's axis k (several
  after a reshape merged them, none for an axis that appeared);
  `gathered[k]` is the id of the gather whose indices made axis k, or None.
  """
  leaf: int
  axes: tuple[frozenset, ...]
  gathered: tuple[Any, ...]

  def pick(self, order) -> "View":
    return View(self.leaf, tuple(self.axes[k] for k in order),
                tuple(self.gathered[k] for k in order))


class Use(NamedTuple):
  """One matrix product that reads a leaf: its roles and where it is."""
  layout: str | None  # None: the product cannot be read as one matrix
  detail: str
  where: str


@dataclasses.dataclass
class Gather:
  leaf: int
  rows: int      # size of the indexed axes (a vocabulary)
  features: int  # size of the rest
  selection: bool = False  # its rows were batched in a product (experts)


class Walk:
  """Collects every use of the parameter leaves in one traced function."""

  def __init__(self, shapes: list[tuple[int, ...]]):
    self.shapes = shapes
    self.uses: dict[int, list[Use]] = {i: [] for i in range(len(shapes))}
    self.gathers: list[Gather] = []

  def run(self, jaxpr, in_views: list[View | None]) -> list[View | None]:
    env: dict[Any, View] = {}
    for v, view in zip(jaxpr.invars, in_views):
      if view is not None:
        env[v] = view
    for eqn in jaxpr.eqns:
      views = [None if isinstance(v, _Literal) else env.get(v)
               for v in eqn.invars]
      if all(x is None for x in views):
        continue
      outs = self._eqn(eqn, views)
      for v, view in zip(eqn.outvars, outs):
        if view is not None:
          env[v] = view
    return [None if isinstance(v, _Literal) else env.get(v)
            for v in jaxpr.outvars]

  # -- one equation ---------------------------------------------------------

  def _eqn(self, eqn, views) -> list[View | None]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    p = eqn.params
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for side, (c, b) in enumerate(((lc, lb), (rc, rb))):
        if views[side] is not None:
          self._dot(views[side], c, b, (), eqn)
      return [None]
    if name.startswith("ragged_dot"):
      self._ragged_dot(eqn, views)
      return [None] * n_out
    if name == "gather":
      return [self._gather(eqn, views[0])]
    if name in _SAME and views[0] is not None:
      return [views[0]] + [None] * (n_out - 1)
    if name == "optimization_barrier":
      return list(views)
    if name == "transpose" and views[0] is not None:
      return [views[0].pick(p["permutation"])]
    if name == "squeeze" and views[0] is not None:
      drop = {d % len(views[0].axes) for d in p["dimensions"]}
      return [views[0].pick([k for k in range(len(views[0].axes))
                             if k not in drop])]
    if name == "reshape" and views[0] is not None:
      return [self._reshape(eqn, views[0])]
    if name == "broadcast_in_dim" and views[0] is not None:
      return [_broadcast(views[0], p["shape"], p["broadcast_dimensions"])]
    if name == "cond":
      return self._cond(eqn, views)
    if name == "while":
      self._while(eqn, views)
      return [None] * n_out
    if name == "scan":
      self._scan(eqn, views)
      return [None] * n_out
    sub = _call_jaxpr(eqn)
    if sub is not None:  # jit, checkpoint, custom_jvp/vjp, closed calls
      jaxpr, _ = _closed(sub)
      return self.run(jaxpr, views)
    return [None] * n_out  # any other op reads the values, not a layout

  def _dot(self, view: View, contract, batch, extra_batch, eqn) -> None:
    contract, batch = set(contract), set(batch) | set(extra_batch)
    gathered = {g for k, g in enumerate(view.gathered) if g is not None}
    if gathered:
      if all(k in batch for k, g in enumerate(view.gathered) if g is not None):
        for g in gathered:  # rows picked per example: stacked experts
          self.gathers[g].selection = True
      else:
        return  # rows of a table used as data (an embedding's output)
    roles: dict[int, str] = {}
    split = []
    for k, origs in enumerate(view.axes):
      role = "i" if k in contract else "b" if k in batch else "o"
      for o in origs:
        if roles.setdefault(o, role) != role:
          split.append(o)
    ndim = len(self.shapes[view.leaf])
    layout = "".join(roles.get(o, "b") for o in range(ndim))
    kept = [k for k in range(len(view.axes))
            if k not in contract and k not in batch]
    detail = (f"contracted on axes {_orig(view, contract)}, batched on"
              f" {_orig(view, batch)}, kept {_orig(view, kept)}")
    if split:
      layout = None
      detail += (f"; axes {sorted(set(split))} are split between roles by a"
                 " reshape")
    self.uses[view.leaf].append(Use(layout, detail, _where(eqn)))

  def _ragged_dot(self, eqn, views) -> None:
    dims = eqn.params.get("ragged_dot_dimension_numbers")
    if views[1] is None:
      return
    if dims is None:  # the plain (m, k) x (g, k, n) form
      self._dot(views[1], (1,), (), (0,), eqn)
      return
    (_, rc), (_, rb) = dims.dot_dimension_numbers
    self._dot(views[1], rc, rb, tuple(dims.rhs_group_dimensions), eqn)

  def _gather(self, eqn, view: View | None) -> View | None:
    """Rows picked by indices: a table lookup, or experts picked per token."""
    if view is None:
      return None
    dims = eqn.params["dimension_numbers"]
    shape = tuple(eqn.invars[0].aval.shape)
    sizes = tuple(eqn.params["slice_sizes"])
    indexed = [k for k in dims.start_index_map if sizes[k] < shape[k]]
    if not indexed:
      return None
    gid = len(self.gathers)
    self.gathers.append(Gather(
        view.leaf, math.prod(shape[k] for k in indexed),
        math.prod(s for k, s in enumerate(sizes) if k not in indexed)))
    if tuple(getattr(dims, "operand_batching_dims", ())):
      return None
    collapsed = set(dims.collapsed_slice_dims)
    offsets = iter(k for k in range(len(shape)) if k not in collapsed)
    rows = frozenset().union(*(view.axes[k] for k in indexed))
    axes, gathered = [], []
    for k in range(len(eqn.outvars[0].aval.shape)):
      if k in dims.offset_dims:
        src = next(offsets)
        axes.append(view.axes[src])
        gathered.append(gid if src in indexed else view.gathered[src])
      else:  # an axis of the indices: one row per index
        axes.append(rows)
        gathered.append(gid)
    return View(view.leaf, tuple(axes), tuple(gathered))

  def _reshape(self, eqn, view: View) -> View | None:
    if eqn.params.get("dimensions") is not None:
      return None
    old = tuple(eqn.invars[0].aval.shape)
    new = tuple(eqn.outvars[0].aval.shape)
    groups = reshape_groups(old, new)
    if groups is None:
      return None
    axes, gathered = [], []
    for old_axes, new_axes in groups:
      # A size-1 axis merged into a larger one takes no role from it.
      real = [k for k in old_axes if old[k] != 1] or old_axes
      marks = {view.gathered[k] for k in real}
      if len(marks) > 1:
        return None  # table rows merged with other axes: not a layout
      merged = frozenset().union(*(view.axes[k] for k in real))
      mark = marks.pop() if marks else None
      axes += [merged] * len(new_axes)
      gathered += [mark] * len(new_axes)
    return View(view.leaf, tuple(axes), tuple(gathered))

  def _cond(self, eqn, views) -> list[View | None]:
    outs = [self.run(_closed(b)[0], views[1:]) for b in eqn.params["branches"]]
    # A branch-independent output view only if every branch agrees.
    return [o[0] if all(x == o[0] for x in o) else None for o in zip(*outs)]

  def _while(self, eqn, views) -> None:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = views[nc + nb:]
    self.run(_closed(p["cond_jaxpr"])[0], views[:nc] + carry)
    self.run(_closed(p["body_jaxpr"])[0], views[nc:nc + nb] + carry)

  def _scan(self, eqn, views) -> None:
    n_consts, n_carry = _scan_layout(eqn.params)
    xs = [None if v is None else v.pick(range(1, len(v.axes)))
          for v in views[n_consts + n_carry:]]
    jaxpr, _ = _closed(eqn.params["jaxpr"])
    self.run(jaxpr, list(views[:n_consts + n_carry]) + xs)


def _call_jaxpr(eqn):
  """The sub-jaxpr of a call whose inputs and outputs are the equation's."""
  for value in eqn.params.values():
    if isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
      jaxpr = _closed(value)[0]
      if (len(jaxpr.invars) == len(eqn.invars)
          and len(jaxpr.outvars) == len(eqn.outvars)):
        return value
  return None


def _broadcast(view: View, shape, dims) -> View:
  axes = [frozenset()] * len(shape)
  gathered = [None] * len(shape)
  for src, dst in enumerate(dims):
    axes[dst] = view.axes[src]
    gathered[dst] = view.gathered[src]
  return View(view.leaf, tuple(axes), tuple(gathered))


def _size(shape, view: View, k: int) -> int:
  return math.prod(shape[o] for o in view.axes[k]) if view.axes[k] else 1


def _orig(view: View, axes) -> list[int]:
  return sorted(set().union(*(view.axes[k] for k in axes)))


def _where(eqn) -> str:
  try:
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # best effort: never a reason to fail
    return "an unknown line"
