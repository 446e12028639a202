"""`infer_layout`: every matmul weight of a model and its layout, traced."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jlora import _grouped_gemm, _paths
from jlora._factored import LayoutError
from jlora._layout_walk import View, Walk
from jlora.node import factor_shapes
from jlora.targets import HEAD_PATTERN, Selector, select, select_inferred


class Layouts(dict):
  """``{path: layout}`` of every matmul weight, as `infer_layout` found it.

  A plain dict (print it, edit it, pass it to `jlora.apply(layout=...)`)
  that also records the weights `apply` leaves alone by default:

  - ``embeddings``: leaves read by a gather (token embedding tables); one
    that is also a matmul weight (a tied output head) is a key too.
  - ``heads``: output heads: a key whose path names one (``lm_head``,
    ``head``, ``classifier``, ...), a tied embedding, or a weight that
    projects back onto an embedding's vocabulary ((features, vocab) against
    a (vocab, features) table).
  - ``targets``: the keys `apply` adapts by default: all but those two.

  Edits in place (``layout[path] = "ioo"``, ``del layout[path]``) keep the
  records, and so do ``layout.copy()`` and ``layout | {...}``; a plain
  ``dict(layout)`` is an ordinary regex-keyed layout dict again, with
  ``"all-linear"`` default targets.

  Examples:
    >>> layout = jlora.infer_layout(fn, params, x)
    >>> layout["blocks/0/attn/qkv/w"], layout.heads
    ('ioo', ('lm_head/kernel',))
  """

  def __init__(self, layouts=(), *, heads=(), embeddings=()):
    super().__init__(layouts)
    self.heads = tuple(heads)
    self.embeddings = tuple(embeddings)

  @property
  def targets(self) -> list[str]:
    skip = set(self.heads) | set(self.embeddings)
    return [p for p in self if p not in skip]

  def copy(self) -> "Layouts":
    return Layouts(self, heads=self.heads, embeddings=self.embeddings)

  def __or__(self, other):
    return Layouts({**self, **other}, heads=self.heads,
                   embeddings=self.embeddings)


def select_targets(leaves: list[tuple[str, Any]], targets: Selector = None,
                   exclude: Selector = None, layout: Any = None) -> list[str]:
  """The paths `jlora.apply` and `jlora.quantize` act on.

  With a `Layouts` from `infer_layout`, among the matmul weights it found
  (by default its ``targets``); with a regex-keyed layout dict or none, by
  name (`jlora.targets.select`, default "all-linear").
  """
  if isinstance(layout, Layouts):
    return select_inferred(leaves, layout, targets, exclude)
  return select(leaves, targets, exclude)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


def _abstract(x: Any) -> Any:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype) if _is_array(x) else x


def infer_layout(fn: Callable[..., Any], params: Any, *args,
                 **kwargs) -> Layouts:
  """Traces ``fn(params, *args, **kwargs)`` and reads each weight's layout.

  Nothing is computed: arguments may be `jax.ShapeDtypeStruct`s (so may the
  params, e.g. from `jax.eval_shape`). Every leaf of `params` that is an
  operand of a matrix product (``dot_general``: Dense, DenseGeneral, Einsum,
  ``x @ w``, an equinox ``Linear``) gets one letter per axis, as
  `jlora.apply` reads them: 'i' contracted (input), 'o' kept (output), 'b'
  stacked (batched in the product, scanned over or indexed away: one
  adapter per index). The leaf is followed through transposes, reshapes,
  casts, slices, nested `jit`, `checkpoint`/`remat`, `scan` (a scanned
  stack's layer axis is 'b'), `cond`, `while`, `shard_map` and
  `custom_jvp`/`custom_vjp` functions, whatever the leaf's name.

  Args:
    fn: a function of the params, e.g. ``lambda p, x: model.apply({"params":
      p}, x)``; for NNX ``lambda s, x: nnx.merge(graphdef, s)(x)``; for
      equinox ``lambda m, x: jax.vmap(m)(x)``.
    params: its first argument: a linen params dict, an `nnx.State`, an
      equinox module, any pytree of arrays.
    *args, **kwargs: the rest of fn's arguments (arrays, shape structs or
      static values).

  Returns:
    A `Layouts` dict ``{'/'-joined path: layout}`` in the params' order,
    e.g. ``{'layers/0/attn/q_einsum/w': 'oio', 'embedder/input_embedding':
    'oi'}``, with ``.heads``, ``.embeddings`` and ``.targets`` (what
    ``jlora.apply(params, layout=layouts)`` adapts by default).

  Raises:
    LayoutError: a weight is contracted on different axes by different
      products, which no single adapter layout can serve; the message lists
      every such weight and its uses.

  Examples:
    >>> fn = lambda p, ids: model.apply({"params": p}, ids)
    >>> layout = jlora.infer_layout(fn, params,
    ...                             jax.ShapeDtypeStruct((1, 16), jnp.int32))
    >>> lp = jlora.apply(params, rank=8, key=key, layout=layout)
  """
  p_leaves = _paths.leaves_with_path(params)
  adapted = [p for p, x in p_leaves if _paths.is_leaf(x)]
  if adapted:
    raise ValueError(
        f"infer_layout takes the base params, but {adapted[:5]} already hold"
        " LoRA adapters or quantized kernels; infer the layout before"
        " jlora.apply / jlora.quantize (or from jlora.merge(params))")
  p_def = jax.tree.structure(params, is_leaf=_paths.is_leaf)
  a_leaves, a_def = jax.tree.flatten((args, kwargs), is_leaf=_paths.is_leaf)
  p_vals = [x for _, x in p_leaves]
  p_dyn = [i for i, x in enumerate(p_vals) if _is_array(x)]
  a_dyn = [i for i, x in enumerate(a_leaves) if _is_array(x)]

  def flat_fn(*values):
    p_full, a_full = list(p_vals), list(a_leaves)
    for i, v in zip(p_dyn, values):
      p_full[i] = v
    for i, v in zip(a_dyn, values[len(p_dyn):]):
      a_full[i] = v
    a, k = jax.tree.unflatten(a_def, a_full)
    return fn(jax.tree.unflatten(p_def, p_full), *a, **k)

  with _grouped_gemm.as_lax_ragged_dot():
    closed = jax.make_jaxpr(flat_fn)(*[_abstract(p_vals[i]) for i in p_dyn],
                                     *[_abstract(a_leaves[i]) for i in a_dyn])
  shapes = [tuple(np.shape(p_vals[i])) for i in p_dyn]
  walk = Walk(shapes)
  views = [View(n, tuple(frozenset([k]) for k in range(len(s))),
                (None,) * len(s)) for n, s in enumerate(shapes)]
  walk.run(closed.jaxpr, views + [None] * len(a_dyn))
  paths = [p_leaves[i][0] for i in p_dyn]
  return _collect(walk, paths, shapes)


def _collect(walk: Walk, paths: list[str], shapes) -> Layouts:
  layouts, conflicts = {}, []
  for n, uses in walk.uses.items():
    kinds = {u.layout for u in uses}
    if not uses:
      continue
    if len(kinds) > 1 or None in kinds:
      conflicts.append((paths[n], shapes[n], uses))
      continue
    layout = kinds.pop()
    # A product that keeps or contracts every axis is not a matmul weight
    # an adapter can serve (a vector, a batched scale).
    if "i" in layout and "o" in layout:
      layouts[paths[n]] = layout
  if conflicts:
    raise LayoutError(_conflict_message(conflicts))
  tables = [g for g in walk.gathers if not g.selection]
  embeddings = list(dict.fromkeys(paths[g.leaf] for g in tables))
  vocab = {(g.features, g.rows) for g in tables}
  heads = []
  for n, path in enumerate(paths):
    if path not in layouts:
      continue
    _, fan_in, fan_out = factor_shapes(layouts[path], shapes[n])
    if (HEAD_PATTERN.search(path) or path in embeddings
        or (fan_in, fan_out) in vocab):
      heads.append(path)
  return Layouts(layouts, heads=heads, embeddings=embeddings)


def _conflict_message(conflicts) -> str:
  lines = []
  for path, shape, uses in conflicts:
    lines.append(f"  '{path}' (shape {shape}) is used by {len(uses)} matrix"
                 " products:")
    seen = set()
    for u in uses:
      if (u.layout, u.detail) in seen:
        continue
      seen.add((u.layout, u.detail))
      as_layout = (f"layout '{u.layout}'" if u.layout is not None
                   else "no layout")
      lines.append(f"    - {u.detail} -> {as_layout}, at {u.where}")
  listed = "\n".join(lines)
  return (
      f"{len(conflicts)} weight(s) are contracted on different axes by"
      f" different products, but a LoRA adapter reads its kernel one way:\n"
      f"{listed}\nUntie the weight (one copy per use), or leave it out of the"
      " params given to infer_layout (close over it in fn) and give"
      " jlora.apply its layout and targets yourself.")
