"""Many named adapters on one frozen base: `AdapterSet`, switching, save/load.

An `AdapterSet` holds the base params once (plain arrays, no `LoRA` nodes)
and, per adapter name, that adapter's half of a LoRA tree: the `LoRA` nodes
with ``w=None`` (``a``, ``b`` and ``e``/``m`` when present, with their static
config) and ``None`` at every other leaf. `select` re-attaches one adapter to
the base kernels (the same array objects: no copy, no reload); ``None``
selects the bare base.

Switching adapters inside a jitted step: pass ``select(adapters, name)``
(a LoRA tree) to the step, not the set. Adapters of equal shapes and static
config (rank, alpha, layout) give the same pytree structure, so switching
never retraces; the set itself carries its active name as static data, so a
step that takes the whole set retraces when `set_active` changes it.

Example:
  >>> adapters = jlora.add_adapter(params, "sql", lp_sql)
  >>> adapters = jlora.add_adapter(adapters, "chat", lp_chat)
  >>> lp = jlora.select(adapters, "sql")
  >>> logits = jlora.wrap(model.apply)({"params": lp}, x)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora import _paths
from jlora.node import (LoRA, MultiLoRA, check_single, factor_shapes, is_lora,
                        is_multi)
from jlora.wrap import wrap as _lora_wrap

__all__ = [
    "AdapterSet", "add_adapter", "load_adapter_set", "remove_adapter",
    "save_adapter_set", "select", "set_active", "stack_adapters",
    "unstack_adapters", "wrap",
]

INDEX_FILE = "adapter_set.json"
SET_FORMAT = "jlora.adapter_set"
FORMAT_VERSION = 2  # 2: the index carries digests of its fields

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class _Active:
  """Sentinel: "the set's active adapter" (distinct from None, the base)."""

  def __repr__(self) -> str:
    return "ACTIVE"


ACTIVE = _Active()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterSet:
  """Named adapters sharing one frozen base; a pytree.

  Fields:
    base: the base params, plain arrays (the original kernels).
    adapters: ``{name: adapter half}``; each half has the structure of
      `base` with a `LoRA` node (``w=None``) at every adapted kernel and
      ``None`` elsewhere. It equals ``jlora.partition(tree)[0]`` except that
      a LoRA-FA node keeps its frozen ``a``.
    active (static): the adapter `select` returns by default; ``None`` is
      the bare base.

  Build it with `add_adapter`; never mutate it (every function returns a new
  set sharing the arrays).
  """

  base: Any
  adapters: dict[str, Any]
  active: str | None = dataclasses.field(metadata=dict(static=True),
                                         default=None)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.adapters)

  def __contains__(self, name: str) -> bool:
    return name in self.adapters

  def __repr__(self) -> str:
    return f"AdapterSet(names={list(self.names)}, active={self.active!r})"


def is_adapter_set(x: Any) -> bool:
  return isinstance(x, AdapterSet)


# ----------------------------------------------------------------- building


def _is_name(name: Any) -> bool:
  return isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in (
      ".", "..")


def _check_name(name: Any) -> str:
  if not _is_name(name):
    raise ValueError(
        f"adapter name {name!r} is not usable as a directory name; use"
        " letters, digits, '_', '-' and '.', e.g. 'sql_v2'")
  return name


def _lora_nodes(tree: Any) -> list[tuple[str, LoRA]]:
  return [(p, x) for p, x in _paths.leaves_with_path(tree) if is_lora(x)]


def _strip(tree: Any) -> Any:
  """Plain params: every `LoRA` node replaced by its base kernel ``w``."""
  nodes = _lora_nodes(tree)
  missing = [p for p, x in nodes if x.w is None]
  if missing:
    raise ValueError(
        f"LoRA nodes at {missing[:5]} lack their base kernel (a partitioned"
        " half?); build the set from a complete tree,"
        " jlora.combine(trainable, frozen), or from the plain base params")
  return jax.tree.map(lambda x: x.w if is_lora(x) else x, tree,
                      is_leaf=is_lora)


def _check_fits(name: str, path: str, node: LoRA, kernel: Any) -> None:
  """Raises unless `node`'s factors fit the base `kernel` at `path`."""
  shape = tuple(getattr(kernel, "shape", ()))
  problem = None
  if len(node.layout) != len(shape):
    problem = f"layout '{node.layout}' for a kernel of shape {shape}"
  else:
    stacked, fan_in, fan_out = factor_shapes(node.layout, shape)
    want_a = (*stacked, fan_in)
    want_b = (*stacked, fan_out)
    if node.a is not None and tuple(node.a.shape[:-1]) != want_a:
      problem = f"a of shape {tuple(node.a.shape)}, expected {want_a + ('r',)}"
    elif node.b is not None and (tuple(node.b.shape[:-2]) + tuple(
        node.b.shape[-1:])) != want_b:
      problem = (f"b of shape {tuple(node.b.shape)}, expected"
                 f" {want_b[:-1] + ('r',) + want_b[-1:]}")
    elif node.w is not None and (tuple(node.w.shape) != shape or
                                 node.w.dtype != kernel.dtype):
      problem = (f"base kernel {tuple(node.w.shape)} {node.w.dtype}, the set's"
                 f" is {shape} {kernel.dtype}")
  if problem:
    raise ValueError(
        f"adapter '{name}' does not fit the set's base at '{path}': {problem};"
        " adapters of one set must be made on the same base params")


def _adapter_half(base: Any, name: str, other: Any) -> Any:
  """`other` (complete LoRA tree or its trainable half) as an adapter half."""
  nodes = _lora_nodes(other)
  if not nodes:
    raise ValueError(
        f"adapter '{name}' holds no LoRA nodes; pass jlora.apply(params, ...)"
        " (after training) or its trainable half")
  complete = {x.w is not None for _, x in nodes}
  if len(complete) > 1:
    raise ValueError(
        f"adapter '{name}' mixes complete LoRA nodes and partitioned halves;"
        " pass either jlora.combine(trainable, frozen) or the trainable half")
  kernels = dict(_paths.leaves_with_path(base))
  found = {}
  for p, node in nodes:
    check_single(node, "add_adapter")
    if p not in kernels:
      raise ValueError(
          f"adapter '{name}' has a LoRA node at '{p}', which is not a leaf of"
          f" the set's base (paths look like {list(kernels)[:4]}); adapters"
          " of one set must be made on the same base params")
    if node.a is None or node.b is None:
      raise ValueError(
          f"adapter '{name}' at '{p}' lacks a or b (the trainable half of a"
          " LoRA-FA node leaves the frozen a out); pass the complete tree,"
          " jlora.combine(trainable, frozen)")
    _check_fits(name, p, node, kernels[p])
    found[p] = dataclasses.replace(node, w=None)
  if not complete.pop():  # a trainable half: other non-None leaves are trained
    full = [p for p, x in _paths.leaves_with_path(other)
            if not is_lora(x) and x is not None]
    if full:
      raise ValueError(
          f"adapter '{name}' trains whole params besides its adapters"
          f" ({full[:4]}, partition(full=...)); an AdapterSet holds LoRA"
          " adapters only: keep those params in the base instead")
  return _paths.map_with_path(lambda p, _: found.get(p), base)


def add_adapter(tree: Any, name: str, other: Any, *, activate: bool = False,
                base_name: str = "default") -> AdapterSet:
  """Returns an `AdapterSet` with adapter `other` added under `name`.

  Args:
    tree: an `AdapterSet`; or plain base params (a new, empty set on them);
      or a LoRA tree, whose own adapter joins the new set as `base_name`
      (PEFT's "default") and is active.
    name: the new adapter's name (letters, digits, ``_-.``; it names a
      directory in `save_adapter_set`).
    other: a LoRA tree over the same base (``jlora.apply`` + training, or
      ``jlora.combine(trainable, frozen)``), or its trainable half. Each
      node's factors must fit the base kernel at its path.
    activate: make `name` the active adapter.
    base_name: name of `tree`'s own adapter when `tree` is a LoRA tree.

  Returns:
    A new set; the base arrays are shared, never copied.

  Example:
    >>> s = jlora.add_adapter(lp_sql, "chat", lp_chat)   # {"default", "chat"}
    >>> jlora.select(s, "chat")
  """
  if is_adapter_set(tree):
    s = tree
  elif _lora_nodes(tree):
    base = _strip(tree)
    s = AdapterSet(base, {_check_name(base_name):
                          _adapter_half(base, base_name, tree)}, base_name)
  else:
    s = AdapterSet(tree, {}, None)
  _check_name(name)
  if name in s.adapters:
    raise ValueError(
        f"adapter '{name}' is already in the set {list(s.names)}; call"
        " remove_adapter first or choose another name")
  adapters = {**s.adapters, name: _adapter_half(s.base, name, other)}
  return AdapterSet(s.base, adapters, name if activate else s.active)


def remove_adapter(adapter_set: AdapterSet, name: str) -> AdapterSet:
  """The set without `name` (the bare base becomes active if it was).

  Example:
    >>> s = jlora.remove_adapter(s, "chat")
  """
  _lookup(adapter_set, name)
  adapters = {k: v for k, v in adapter_set.adapters.items() if k != name}
  active = None if adapter_set.active == name else adapter_set.active
  return AdapterSet(adapter_set.base, adapters, active)


def set_active(adapter_set: AdapterSet, name: str | None) -> AdapterSet:
  """The set with `name` active (``None``: the bare base); PEFT's set_adapter.

  Example:
    >>> s = jlora.set_active(s, "sql"); lp = jlora.select(s)
  """
  if name is not None:
    _lookup(adapter_set, name)
  return dataclasses.replace(adapter_set, active=name)


# ---------------------------------------------------------------- selecting


def _lookup(adapter_set: AdapterSet, name: str) -> Any:
  if not is_adapter_set(adapter_set):
    raise TypeError(f"expected an AdapterSet, got {type(adapter_set).__name__};"
                    " build one with jlora.add_adapter")
  try:
    return adapter_set.adapters[name]
  except KeyError:
    raise KeyError(
        f"no adapter '{name}' in the set; it holds {list(adapter_set.names)}"
        " (or pass None for the bare base)") from None


def _attach(base: Any, half: Any) -> Any:
  return jax.tree.map(
      lambda h, k: k if h is None else dataclasses.replace(h, w=k), half,
      base, is_leaf=lambda x: x is None or is_lora(x))


def select(adapter_set: AdapterSet, name: str | None | _Active = ACTIVE
           ) -> Any:
  """One adapter on the base: a LoRA tree, or the plain base for ``None``.

  The returned nodes hold the set's base kernels themselves (``node.w is
  base_kernel``): selecting copies nothing. ``select(s, None)`` is the
  original params, so no `merge` is needed to run the bare base. Works
  under `jit`.

  Args:
    adapter_set: the set.
    name: an adapter name, ``None`` for the bare base; default the set's
      active adapter.

  Example:
    >>> forward = jax.jit(jlora.wrap(model.apply))
    >>> y_sql = forward({"params": jlora.select(s, "sql")}, x)
    >>> y_chat = forward({"params": jlora.select(s, "chat")}, x)  # no retrace
  """
  if not is_adapter_set(adapter_set):
    raise TypeError(f"select expects an AdapterSet, got"
                    f" {type(adapter_set).__name__}; build one with"
                    " jlora.add_adapter")
  if name is ACTIVE:
    name = adapter_set.active
  if name is None:
    return adapter_set.base
  half = _lookup(adapter_set, name)
  return _attach(adapter_set.base, half)


# ------------------------------------------------------ mixed-adapter batches


def _stack_node(path: str, kernel: Any, nodes: dict[str, LoRA | None]
                ) -> MultiLoRA:
  present = {k: v for k, v in nodes.items() if v is not None}
  for field, what in (("layout", "layouts"), ("dropout", "dropout rates"),
                      ("train_a", "train_a flags")):
    values = {getattr(v, field) for v in present.values()}
    if len(values) > 1:
      raise ValueError(
          f"adapters {list(present)} differ in {what} at '{path}' ({values});"
          " adapters stacked for one batch must agree there")
  dora = [k for k, v in present.items() if v.m is not None]
  if dora:
    raise ValueError(
        f"adapters {dora} are DoRA adapters (at '{path}'), whose per-column"
        " norm needs each adapter's fused kernel; mixed-adapter batches take"
        " plain LoRA adapters: merge the DoRA ones into the base instead")
  ref = next(iter(present.values()))
  r_max = max(v.rank for v in present.values())
  stacked, fan_in, fan_out = factor_shapes(ref.layout, tuple(kernel.shape))
  dtype = jnp.result_type(*[v.a for v in present.values()],
                          *[v.b for v in present.values()])

  def padded(v: LoRA | None):
    if v is None:
      return (jnp.zeros((*stacked, fan_in, r_max), dtype),
              jnp.zeros((*stacked, r_max, fan_out), dtype))
    b = v.b if v.e is None else v.e[..., :, None] * v.b  # AdaLoRA: fold e
    pad = r_max - v.rank
    a = jnp.pad(v.a.astype(dtype), [(0, 0)] * (v.a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b.astype(dtype), [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
    return a, b

  factors = [padded(v) for v in nodes.values()]
  return MultiLoRA(
      w=kernel, a=jnp.stack([f[0] for f in factors]),
      b=jnp.stack([f[1] for f in factors]), alpha=1.0, layout=ref.layout,
      path=path, dropout=ref.dropout, train_a=ref.train_a,
      names=tuple(nodes), ranks=tuple(0 if v is None else v.rank
                                      for v in nodes.values()),
      alphas=tuple(0.0 if v is None else float(v.alpha)
                   for v in nodes.values()),
      rsloras=tuple(False if v is None else bool(v.rslora)
                    for v in nodes.values()))


def stack_adapters(adapter_set: AdapterSet, names: list[str] | None = None
                   ) -> Any:
  """The set's adapters stacked per kernel, for mixed-adapter batches.

  Returns the base params with a `MultiLoRA` node at every kernel that any
  of `names` adapts. ``jlora.wrap(fn)(tree, x, adapter_ids=ids)`` then runs
  example ``k`` with adapter ``names[ids[k]]`` (``-1``: the bare base), for
  inference and training alike: gradients reach each adapter's own slice.
  Ranks may differ (zero-padded to the largest) and so may targets (zero
  factors where an adapter has none); AdaLoRA's ``e`` is folded into ``b``.
  DoRA adapters are refused. `unstack_adapters` is the inverse.

  Args:
    adapter_set: the set.
    names: the adapters, in id order (default: all, in the set's order).

  Example:
    >>> tree = jlora.stack_adapters(s, ["sql", "chat"])
    >>> ids = jnp.array([0, 1, 1, -1])           # per example; -1: base
    >>> y = jlora.wrap(model.apply)({"params": tree}, x, adapter_ids=ids)
  """
  if not is_adapter_set(adapter_set):
    raise TypeError(f"stack_adapters expects an AdapterSet, got"
                    f" {type(adapter_set).__name__}; build one with"
                    " jlora.add_adapter")
  names = list(adapter_set.names if names is None else names)
  if not names:
    raise ValueError("no adapters to stack; add_adapter first")
  if len(set(names)) != len(names):
    raise ValueError(f"names {names} repeat an adapter")
  halves = {n: dict(_lora_nodes(_lookup(adapter_set, n))) for n in names}

  def stack(path, kernel):
    nodes = {n: halves[n].get(path) for n in names}
    if all(v is None for v in nodes.values()):
      return kernel
    return _stack_node(path, kernel, nodes)

  return _paths.map_with_path(stack, adapter_set.base)


def unstack_adapters(tree: Any) -> AdapterSet:
  """The `AdapterSet` of a `stack_adapters` tree (e.g. after training).

  Each adapter gets back its own rank (padding dropped) and config; an
  adapter appears at the kernels it adapts only.

  Example:
    >>> s2 = jlora.unstack_adapters(trained_stack)
    >>> jlora.save_adapter_set("/tmp/adapters", s2)
  """
  nodes = [(p, x) for p, x in _lora_nodes(tree) if is_multi(x)]
  if not nodes:
    raise ValueError("the tree holds no MultiLoRA nodes; make them with"
                     " jlora.stack_adapters")
  names = nodes[0][1].names
  other = [p for p, x in nodes if x.names != names]
  if other:
    raise ValueError(f"MultiLoRA nodes at {other[:4]} stack other adapters"
                     f" than {list(names)}")
  base = _strip(tree)
  s = AdapterSet(base, {}, None)
  for i, name in enumerate(names):
    single = {}
    for p, x in nodes:
      r = x.ranks[i]
      if r:
        single[p] = LoRA(w=None, a=x.a[i, ..., :r], b=x.b[i, ..., :r, :],
                         alpha=x.alphas[i], layout=x.layout,
                         rslora=x.rsloras[i], path=x.path, dropout=x.dropout,
                         train_a=x.train_a)
    s = AdapterSet(base, {**s.adapters, _check_name(name): _paths.map_with_path(
        lambda p, _: single.get(p), base)}, None)
  return s


def wrap(fn: Callable[..., Any], adapter: str | None | _Active = ACTIVE, *,
         adapter_ids_axis: int | None = None) -> Callable[..., Any]:
  """`jlora.wrap` that accepts `AdapterSet`s in its arguments.

  Every `AdapterSet` among the arguments (at any depth, e.g.
  ``{"params": s}``) is replaced by ``select(s, adapter)`` before the call
  goes to ``jlora.wrap(fn)``: factored LoRA matmuls, ``lora_rng`` for
  adapter dropout. Given ``adapter_ids``, each set is instead stacked
  (`stack_adapters`, ids index ``s.names``) for a mixed-adapter batch;
  stack once outside a loop to avoid re-stacking per call.

  Args:
    fn: e.g. ``model.apply``.
    adapter: the adapter to run; default each set's active one; ``None``
      runs the bare base.
    adapter_ids_axis: the batch axis for ``adapter_ids``, as in `jlora.wrap`.

  Example:
    >>> sql = jlora.wrap_adapter(model.apply, adapter="sql")
    >>> logits = sql({"params": s}, x)
  """
  lora_fn = _lora_wrap(fn, adapter_ids_axis=adapter_ids_axis)

  @functools.wraps(fn)
  def wrapped(*args, adapter_ids=None, **kwargs):
    if adapter_ids is None:
      pick = lambda x: select(x, adapter)
    else:
      kwargs["adapter_ids"] = adapter_ids
      pick = stack_adapters
    args, kwargs = jax.tree.map(
        lambda x: pick(x) if is_adapter_set(x) else x,
        (args, kwargs), is_leaf=is_adapter_set)
    return lora_fn(*args, **kwargs)

  return wrapped


# ----------------------------------------------------------------- storage


def _set_kind():
  """What `save_adapter_set` may replace: an adapter set and nothing else."""
  from jlora import _atomic_dir
  from jlora.checkpoint import ADAPTER_FORMAT

  def listed(directory) -> list[str] | None:
    index = _atomic_dir.read_json(directory / INDEX_FILE)
    if index is None or index.get("format") != SET_FORMAT:
      return None
    names = index.get("adapters")
    if not isinstance(names, list) or not all(map(_is_name, names)):
      return None
    return names

  def recognize(directory) -> str | None:
    names = listed(directory)
    if names is None:
      return f"is not a jlora adapter set (no readable {INDEX_FILE})"
    foreign = [n for n in _atomic_dir.entries(directory)
               if n != INDEX_FILE and n not in names]
    if foreign:
      return f"holds entries jlora did not write: {foreign[:8]}"
    for name in names:
      if (directory / name).exists():
        why = _atomic_dir.recognize_checkpoint(directory / name,
                                               ADAPTER_FORMAT)
        if why is not None:
          return f"lists adapter '{name}', whose directory {why}"
    return None

  def verify(directory) -> None:
    for name in listed(directory) or []:
      _atomic_dir.verify_checkpoint(directory / name, ADAPTER_FORMAT)

  return _atomic_dir.Kind("a jlora adapter set", recognize, verify)


def save_adapter_set(path, adapter_set: AdapterSet, *,
                     overwrite: bool = False) -> None:
  """Writes every adapter of the set (never the base) under `path`.

  Layout: ``path/<name>/`` is a `jlora.save_adapter` checkpoint of each
  adapter (loadable alone with `jlora.load_adapter`), and
  ``path/adapter_set.json`` lists the names and the active one. The whole
  set is written beside `path` and swapped in once complete, as
  `jlora.save_adapter` does: a failed save leaves the old set whole, and
  `overwrite` replaces only a jlora adapter set (adapters of the old set
  that are not in this one go with it); anything else at `path` raises
  `jlora.checkpoint.NotACheckpointError`.

  Example:
    >>> jlora.save_adapter_set("/tmp/adapters", s)
    >>> s2 = jlora.load_adapter_set("/tmp/adapters", params)
  """
  from jlora import _checkpoint_io as io
  from jlora.checkpoint import write_adapter

  if not adapter_set.names:
    raise ValueError("the adapter set is empty; add_adapter first")
  names = [_check_name(name) for name in adapter_set.names]
  with io.saving(path, _set_kind(), overwrite=overwrite) as tmp:
    if jax.process_index() == 0:
      tmp.mkdir()
    for name in names:
      write_adapter(tmp / name, select(adapter_set, name),
                    metadata={"adapter_set": name})
    if jax.process_index() == 0:
      (tmp / INDEX_FILE).write_text(json.dumps(io.seal({
          "format": SET_FORMAT, "format_version": FORMAT_VERSION,
          "adapters": names, "active": adapter_set.active}), indent=1))


def load_adapter_set(path, base_params: Any, *,
                     names: list[str] | None = None, **kwargs) -> AdapterSet:
  """Reads a `save_adapter_set` directory onto plain base params.

  Each adapter is loaded with `jlora.load_adapter` (checked against the
  base fingerprint; `kwargs` such as ``shardings`` go to it), and the result
  equals the saved set bit for bit.

  Args:
    path: the directory.
    base_params: the plain base params the adapters were trained on.
    names: load only these adapters (default: all in the index).

  Raises:
    FileNotFoundError: no index, or an adapter's directory is missing (named).
    CheckpointCorruptError: an unreadable or edited index, or a damaged
      adapter (named).

  Example:
    >>> s = jlora.load_adapter_set("/tmp/adapters", params, names=["sql"])
  """
  from jlora import _checkpoint_io as io

  with io.reading(path) as directory:
    return _load_adapter_set(directory, base_params, names, kwargs)


def _load_adapter_set(directory, base_params, names, kwargs) -> AdapterSet:
  from jlora import _checkpoint_io as io
  from jlora.checkpoint import load_adapter

  index_path = directory / INDEX_FILE
  if not index_path.exists():
    raise FileNotFoundError(
        f"no adapter set at {directory} (no {INDEX_FILE}); write one with"
        " jlora.save_adapter_set, or load a single adapter with"
        " jlora.load_adapter")
  try:
    index = json.loads(index_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise io.CheckpointCorruptError(
        f"{index_path} is not readable JSON ({e}); save the set again, or"
        " load its adapters one by one with jlora.load_adapter") from e
  if not isinstance(index, dict) or index.get("format") != SET_FORMAT:
    raise ValueError(f"{index_path} is not a jlora adapter set index")
  # An index of format_version 1 has no digests: its adapters are checked.
  io.check_seal(index, directory, True, record=index_path)
  saved = index.get("adapters")
  if not isinstance(saved, list):
    raise io.CheckpointCorruptError(
        f"{index_path} has no list of 'adapters'; save the set again")
  bad = [n for n in saved if not _is_name(n)]
  if bad:
    raise ValueError(f"{index_path} lists invalid adapter names {bad}")
  wanted = saved if names is None else list(names)
  unknown = [n for n in wanted if n not in saved]
  if unknown:
    raise KeyError(f"adapters {unknown} are not in the set at {directory},"
                   f" which holds {saved}")
  s = AdapterSet(base_params, {}, None)
  for name in wanted:
    sub = directory / name
    if not sub.exists():
      others = [n for n in wanted if n != name]
      raise FileNotFoundError(
          f"adapter '{name}' listed in {index_path} has no directory {sub};"
          f" restore it, or load the others with names={others}")
    s = add_adapter(s, name, load_adapter(sub, base_params, **kwargs))
  active = index.get("active")
  return set_active(s, active if active in s.adapters else None)
