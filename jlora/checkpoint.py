"""Adapters as files: Orbax adapter, merged and training checkpoints.

- `save_adapter` / `load_adapter`: only the adapter arrays of each `LoRA`
  node (``a``, ``b``, and ``e``/``m`` when present) plus a JSON record of the
  LoRA configuration and a fingerprint (path, shape, dtype) of every targeted
  base kernel. Loading re-attaches them to plain base params, checked against
  the fingerprint, restored straight into the shardings of a sharded base.
- `save_merged` / `load_merged`: the fused params of `jlora.merge`.
- `CheckpointManager`: resumable training (adapters, optax state, step, PRNG
  key, JSON extras) over `orbax.checkpoint.CheckpointManager`.

Every checkpoint is a plain Orbax composite checkpoint (items ``arrays`` and
``meta``) with three integrity checks of jlora's own: per-array checksums and
a digest of every field of the record in ``meta``, and a file manifest (size,
CRC32). A damaged file or an edited record raises `CheckpointCorruptError`
naming it; an interrupted save is never listed as a step.

Saves never lose data: `save_adapter` / `save_merged` write beside the
target and swap the new directory in only once it is complete, so the old
checkpoint survives any failure of the new save; they replace only a
checkpoint of their own kind (anything else raises `NotACheckpointError`);
two processes saving one path take turns on a lock file beside it
(``.<name>.jlora-lock``). See `jlora._atomic_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import numbers
from typing import Any, Callable, NamedTuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora import _atomic_dir
from jlora import _checkpoint_io as io
from jlora import _paths
from jlora.inject import _adapter_shardings
from jlora.merge import merge
from jlora.node import check_single, is_lora
from jlora._atomic_dir import CheckpointBusyError, NotACheckpointError
from jlora._checkpoint_io import CheckpointCorruptError, CheckpointMismatchError

__all__ = [
    "AdapterMismatchError", "CheckpointBusyError", "CheckpointCorruptError",
    "CheckpointManager", "CheckpointMismatchError", "NotACheckpointError",
    "Restored", "load_adapter", "load_merged", "read_metadata",
    "save_adapter", "save_merged",
]

ADAPTER_FORMAT = "jlora.adapter"
MERGED_FORMAT = "jlora.merged"
TRAIN_FORMAT = "jlora.train"
# 2: the record carries per-field digests ("integrity") and the base
# kernels' value checksums. Version 1 records still load (see check_seal).
FORMAT_VERSION = 2
ADAPTER_KIND = io.checkpoint_kind(ADAPTER_FORMAT, "a jlora adapter")
MERGED_KIND = io.checkpoint_kind(MERGED_FORMAT, "a jlora merged-params")

Shardings = Union[None, jax.sharding.Sharding,
                  Callable[[str, str, Any], Any]]


class AdapterMismatchError(CheckpointMismatchError):
  """An adapter does not fit the base params it is loaded onto.

  ``mismatches`` lists ``(path, expected, found)`` for each problem.
  """


def _static_names(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]


def _data_names(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)
          if not f.metadata.get("static")]


def _json_value(value: Any, what: str) -> Any:
  try:
    json.dumps(value)
  except TypeError as e:
    raise TypeError(f"{what} must be JSON-serialisable: {e}") from e
  return value


def _node_class(name: str):
  module, _, qualname = name.rpartition(".")
  if not module.startswith("jlora"):
    raise CheckpointCorruptError(
        f"adapter record names class '{name}' outside jlora; refusing to"
        " import it")
  return getattr(importlib.import_module(module), qualname)


# ----------------------------------------------------------------- adapters


def _kernel_checksums(kernels: dict[str, Any]) -> dict[str, str]:
  """Value checksums of base kernels: 16 hex digits for an array,
  ``"quantized:"`` + a digest of its parts for a quantized kernel."""
  def concrete(x):  # not abstract, not donated
    deleted = getattr(x, "is_deleted", None)  # tracers have none
    return isinstance(x, np.ndarray) or (
        isinstance(x, jax.Array) and deleted is not None and not deleted())

  plain = {p: k for p, k in kernels.items() if concrete(k)}
  out = io.checksums(plain) if plain else {}
  for p, k in kernels.items():
    if p in plain:
      continue
    leaves = jax.tree.leaves(k)
    if not leaves or not all(map(concrete, leaves)):
      continue  # abstract, donated or unknown: shape and dtype only
    parts = io.checksums({str(i): x for i, x in enumerate(leaves)})
    out[p] = "quantized:" + hashlib.sha256(
        ",".join(parts[str(i)] for i in range(len(leaves))).encode()
    ).hexdigest()[:16]
  return out


def _adapter_record(tree: Any, metadata: dict | None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The arrays and JSON record `save_adapter` writes."""
  nodes = [(p, x) for p, x in _paths.leaves_with_path(tree) if is_lora(x)]
  if not nodes:
    raise ValueError("save_adapter found no LoRA nodes in the tree; call"
                     " jlora.apply(params, ...) first")
  arrays, targets, base = {}, {}, {}
  for p, node in nodes:
    check_single(node, "save_adapter")
    if node.w is None or node.a is None:
      raise ValueError(
          f"LoRA node '{p}' lacks its base kernel or adapter (a partitioned"
          " half?); pass jlora.combine(trainable, frozen) so the base"
          " fingerprint can be recorded")
    cls = type(node)
    record = {"class": f"{cls.__module__}.{cls.__qualname__}",
              "rank": node.rank}
    for name in _static_names(cls):
      record[name] = _json_value(getattr(node, name),
                                 f"static field '{name}' of '{p}'")
    fields = {}
    for name in _data_names(cls):
      value = getattr(node, name)
      if name == "w" or value is None:
        continue
      arrays[f"{p}/{name}"] = value
      fields[name] = io.spec(value)
    record["fields"] = fields
    targets[p] = record
    base[p] = {"shape": [int(s) for s in node.w.shape],
               "dtype": np.dtype(node.w.dtype).name}
  sums = io.checksums(arrays)
  for p, record in targets.items():
    for name, s in record["fields"].items():
      s["checksum"] = sums[f"{p}/{name}"]
  for p, checksum in _kernel_checksums(
      {p: node.w for p, node in nodes}).items():
    base[p]["checksum"] = checksum
  meta = {"format": ADAPTER_FORMAT, "format_version": FORMAT_VERSION,
          "jlora_version": io.jlora_version(),
          "metadata": _json_value(metadata or {}, "metadata"),
          "targets": targets, "base": base}
  return arrays, meta


def write_adapter(directory, tree: Any, metadata: dict | None = None) -> None:
  """`save_adapter` into a directory that does not exist (no swap, no
  lock): for a caller that swaps a whole tree in, e.g. `save_adapter_set`."""
  arrays, meta = _adapter_record(tree, metadata)
  io.write_checkpoint(io.as_path(directory), arrays, meta)


def save_adapter(path, tree: Any, *, metadata: dict | None = None,
                 overwrite: bool = False) -> None:
  """Writes the adapters of a LoRA tree (never the base) as an Orbax checkpoint.

  Saved: every non-``None`` array field of each `LoRA` node except ``w``
  (``a`` (*stacked, in, r), ``b`` (*stacked, r, out), and ``e``/``m`` when
  present), so the size on disk is the adapter bytes plus a few KiB. The JSON
  record holds the jlora version, `metadata`, each target's configuration
  (class, rank and static fields: alpha, layout, rslora, dropout, path;
  shape, dtype and checksum of every saved field), the base fingerprint
  (path, shape, dtype and a value checksum of every targeted kernel) and a
  digest of each of its own fields.

  The checkpoint is written beside `path` and swapped in once complete: if
  the save fails (full disk, a crash), the checkpoint that was at `path`
  is still there, whole. A symlink at `path` is followed.

  Args:
    path: a directory that does not exist yet, an empty one, or (with
      `overwrite`) a jlora adapter checkpoint; local or any path Orbax
      writes (e.g. ``gs://``).
    tree: a LoRA tree holding the base kernels (``jlora.apply``'s output, or
      ``jlora.combine(trainable, frozen)``).
    metadata: JSON-serialisable user record, returned by `read_metadata`.
    overwrite: replace an existing adapter checkpoint at `path`.

  Raises:
    FileExistsError: an adapter is at `path` and `overwrite` is False.
    NotACheckpointError (a FileExistsError): `path` is a file, a directory
      that is not a jlora adapter checkpoint (the user's files, a merged
      checkpoint...), or inside another checkpoint. It is never deleted.
    CheckpointBusyError: another process kept writing `path` for longer
      than 10 minutes (two savers of one path take turns).

  Examples:
    >>> jlora.save_adapter("/tmp/adapter", lp, metadata={"task": "sst2"})
    >>> lp2 = jlora.load_adapter("/tmp/adapter", params)
  """
  arrays, meta = _adapter_record(tree, metadata)
  with io.saving(path, ADAPTER_KIND, overwrite=overwrite) as tmp:
    io.write_checkpoint(tmp, arrays, meta)


def read_metadata(path) -> dict[str, Any]:
  """The JSON record of a jlora checkpoint (adapter, merged or a step dir).

  Examples:
    >>> jlora.read_metadata("/tmp/adapter")["targets"]["dense/kernel"]["rank"]
    8
  """
  with io.reading(path) as directory:
    return io.open_checked(directory)


def _field_sharding(kernel: Any, layout: str, name: str):
  """Sharding of an adapter field derived from its kernel's sharding."""
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
      return sharding
    return None
  if name in ("a", "b"):
    return _adapter_shardings(kernel, layout)[name == "b"]
  spec = tuple(sharding.spec) + (None,) * (len(layout) - len(sharding.spec))
  stacked = [s for s, r in zip(spec, layout) if r == "b"]
  first_out = next(s for s, r in zip(spec, layout) if r == "o")
  P = jax.sharding.PartitionSpec
  if name == "e":    # (*stacked, r)
    return jax.sharding.NamedSharding(sharding.mesh, P(*stacked, None))
  if name == "m":    # (*stacked, out)
    return jax.sharding.NamedSharding(sharding.mesh, P(*stacked, first_out))
  return jax.sharding.NamedSharding(sharding.mesh, P())


def _fingerprint_problems(meta, kernels, lora_paths, allow_missing,
                          allow_extra, allow_other_base):
  problems, fatal = [], []
  for p, want in meta["base"].items():
    shape, dtype = tuple(want["shape"]), want["dtype"]
    if p not in kernels:
      if not allow_missing:
        problems.append((p, f"kernel {shape} {dtype}", "no such path"))
      continue
    k = kernels[p]
    found_shape = tuple(int(s) for s in k.shape)
    found_dtype = np.dtype(k.dtype).name
    if found_shape != shape:
      fatal.append((p, f"shape {shape}", f"shape {found_shape}"))
    if found_dtype != dtype:
      fatal.append((p, f"dtype {dtype}", f"dtype {found_dtype}"))
  if not fatal and not allow_other_base:
    # Only like with like: an adapter trained on a quantized base may be
    # loaded onto the unquantized one (to merge, as QLoRA does).
    saved = {p: want["checksum"] for p, want in meta["base"].items()
             if "checksum" in want and p in kernels}
    found = _kernel_checksums({p: kernels[p] for p in saved})
    fatal += [(p, f"values with checksum {saved[p]}",
               f"values with checksum {found[p]}")
              for p in saved if p in found and found[p] != saved[p]
              and found[p].startswith("quantized:") == saved[p].startswith(
                  "quantized:")]
  if not allow_extra:
    problems += [(p, "no adapter", "a LoRA node") for p in lora_paths
                 if p not in meta["base"]]
  return problems, fatal


def _mismatch_message(path, problems, fatal) -> str:
  lines = [f"  '{p}': expected {e}, found {f}" for p, e, f in fatal + problems]
  fixes = []
  if any(f == "no such path" for _, _, f in problems):
    fixes.append("pass allow_missing=True to skip adapters whose kernel is"
                 " not in these params (a subset of the targets)")
  if any(f == "a LoRA node" for _, _, f in problems):
    fixes.append("pass allow_extra=True to keep the LoRA nodes of the base"
                 " that the adapter does not cover (a superset)")
  if any(e.startswith("shape") for _, e, _ in fatal):
    fixes.append("the adapter was trained on another model: load it onto"
                 " the params it was trained on")
  if any(e.startswith("dtype") for _, e, _ in fatal):
    fixes.append("cast the base to the saved dtype, e.g. jax.tree.map(lambda"
                 " x: x.astype(jnp.bfloat16), params)")
  if any(e.startswith("values") for _, e, _ in fatal):
    fixes.append("these kernels are not the ones the adapter was trained on"
                 " (another checkpoint of the same architecture?): load it"
                 " onto its own base, or pass allow_other_base=True if that"
                 " is intended (e.g. a re-converted copy)")
  return (f"adapter {path} does not fit these params ({len(lines)}"
          " problem(s)):\n" + "\n".join(lines) + "\nfix: " + "; ".join(fixes))


def load_adapter(path, base_params: Any, *, allow_missing: bool = False,
                 allow_extra: bool = False, allow_other_base: bool = False,
                 shardings: Shardings = None) -> Any:
  """Re-attaches a saved adapter to base params; returns the LoRA tree.

  The result equals, bit for bit and with the same static fields, the tree
  that was saved (``jlora.apply`` + training). Each targeted kernel is
  checked against the saved fingerprint first (path, shape, dtype, and the
  checksum of its values); every problem is reported in one
  `AdapterMismatchError`.

  Args:
    path: a directory written by `save_adapter`.
    base_params: the plain base params (no LoRA nodes), or a LoRA tree, whose
      nodes at saved paths get the saved adapters (their own ``w`` is kept).
    allow_missing: skip saved adapters whose path is not in `base_params`
      (restore onto a subset of the targets). Default: an error.
    allow_extra: keep, unchanged, LoRA nodes of `base_params` that the
      adapter does not cover (a superset of the targets). Default: an error.
    allow_other_base: accept kernels of the saved shapes and dtypes whose
      values differ from those the adapter was saved with (another model of
      the same architecture, a re-converted copy). Default: an error. The
      values are compared only like with like: an adapter trained on a
      quantized base loads onto the plain one, and records written before
      jlora recorded value checksums are checked for shape and dtype only.
    shardings: where the adapter arrays go. ``None``: derived from each
      kernel's ``NamedSharding`` (``a``: the kernel's stacked-axes spec + its
      first input axis, rank replicated; ``b``: stacked + ``None`` + first
      output axis), read straight into it by Orbax; single-device otherwise.
      A `jax.sharding.Sharding`: for every array. A callable
      ``(path, field, kernel) -> Sharding | None``: per array.

  Raises:
    AdapterMismatchError: a target path missing from the base, a kernel
      shape, dtype or values differing from the fingerprint.
    CheckpointCorruptError: a damaged or truncated file, or an edited
      record (named).
    FileNotFoundError / NotADirectoryError: no checkpoint at `path` (the
      message says what is there instead).

  Examples:
    >>> lp = jlora.load_adapter("/tmp/adapter", params)
    >>> logits = jlora.wrap(model.apply)({"params": lp}, x)
  """
  with io.reading(path) as directory:
    return _load_adapter(directory, base_params, allow_missing, allow_extra,
                         allow_other_base, shardings)


def _load_adapter(directory, base_params, allow_missing, allow_extra,
                  allow_other_base, shardings):
  meta = io.open_checked(directory, ADAPTER_FORMAT, "an adapter",
                         "use load_merged or CheckpointManager")
  leaves = dict(_paths.leaves_with_path(base_params))
  kernels = {p: (x.w if is_lora(x) else x) for p, x in leaves.items()}
  lora_paths = [p for p, x in leaves.items() if is_lora(x)]
  problems, fatal = _fingerprint_problems(meta, kernels, lora_paths,
                                          allow_missing, allow_extra,
                                          allow_other_base)
  if problems or fatal:
    raise AdapterMismatchError(_mismatch_message(directory, problems, fatal),
                               fatal + problems)

  targets, expected = {}, {}
  for p, record in meta["targets"].items():
    for name, s in record["fields"].items():
      sharding = None
      if p in kernels:
        if callable(shardings):
          sharding = shardings(p, name, kernels[p])
        elif shardings is not None:
          sharding = shardings
        else:
          sharding = _field_sharding(kernels[p], record["layout"], name)
      targets[f"{p}/{name}"] = io.abstract(s["shape"], s["dtype"], sharding)
      expected[f"{p}/{name}"] = s["checksum"]
  arrays = io.restore_arrays(directory, targets)
  io.check_checksums(arrays, expected, directory)

  def attach(p: str, leaf: Any) -> Any:
    record = meta["targets"].get(p)
    if record is None:
      return leaf
    cls = _node_class(record["class"])
    static = {n: record[n] for n in _static_names(cls) if n in record}
    data = {n: arrays.get(f"{p}/{n}") for n in _data_names(cls) if n != "w"}
    return cls(w=kernels[p], **data, **static)

  return _paths.map_with_path(attach, base_params)


# ------------------------------------------------------------------- merged


def save_merged(path, tree: Any, *, metadata: dict | None = None,
                overwrite: bool = False) -> None:
  """Writes ``jlora.merge(tree)``: plain params, each kernel in its base dtype.

  Loadable with plain Orbax (item ``arrays``) or `load_merged`. Written
  beside `path` and swapped in once complete, replacing only a merged
  checkpoint (with `overwrite`), as `save_adapter` does.

  Examples:
    >>> jlora.save_merged("/tmp/merged", lp)
    >>> params = jlora.load_merged("/tmp/merged", like=params)
  """
  flat, _ = io.flatten(merge(tree))
  arrays, impls = io.to_savable(flat)
  sums = io.checksums(arrays)
  meta = {"format": MERGED_FORMAT, "format_version": FORMAT_VERSION,
          "jlora_version": io.jlora_version(),
          "metadata": _json_value(metadata or {}, "metadata"),
          "arrays": {k: {**io.spec(x), "checksum": sums[k]}
                     for k, x in arrays.items()},
          "keys": impls}
  with io.saving(path, MERGED_KIND, overwrite=overwrite) as tmp:
    io.write_checkpoint(tmp, arrays, meta)


def _check_like(directory, saved: dict, like_flat: dict, what: str) -> None:
  problems = [(k, "(not saved)", "in like") for k in like_flat
              if k not in saved]
  problems += [(k, "saved", "missing from like") for k in saved
               if k not in like_flat]
  for k, x in like_flat.items():
    if k in saved:
      want = (tuple(saved[k]["shape"]), saved[k]["dtype"])
      got = io.abstract_like(x)
      found = (tuple(got.shape), np.dtype(got.dtype).name)
      if want != found:
        problems.append((k, f"{want[0]} {want[1]}", f"{found[0]} {found[1]}"))
  if problems:
    lines = "\n".join(f"  '{k}': checkpoint {e}, like {f}"
                      for k, e, f in problems[:20])
    raise CheckpointMismatchError(
        f"{what} of checkpoint {directory} does not match `like`"
        f" ({len(problems)} problem(s)):\n{lines}\nfix: build `like` the way"
        " the saved tree was built (same targets, ranks, dtypes and"
        " optimizer), e.g. from jlora.apply + tx.init before restoring",
        problems)


def _rebuild(flat: dict, like_flat: dict, treedef, impls: dict) -> Any:
  leaves = []
  for k, x in like_flat.items():
    value = flat[k]
    if k in impls:
      value = jax.random.wrap_key_data(value, impl=impls[k])
    elif isinstance(x, (bool, int, float)):
      value = type(x)(value)
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def load_merged(path, like: Any = None) -> Any:
  """Reads a `save_merged` checkpoint.

  Args:
    path: the directory.
    like: optional tree (arrays or `jax.ShapeDtypeStruct`s) giving the
      structure and shardings; without it, nested dicts of arrays keyed like
      the saved '/'-joined paths (a linen params dict comes back as saved).

  Examples:
    >>> params = jlora.load_merged("/tmp/merged", like=params)
  """
  with io.reading(path) as directory:
    return _load_merged(directory, like)


def _load_merged(directory, like):
  meta = io.open_checked(directory, MERGED_FORMAT, "merged params",
                         "use load_adapter")
  saved = meta["arrays"]
  if like is None:
    targets = {k: io.abstract(s["shape"], s["dtype"]) for k, s in saved.items()}
  else:
    like_flat, treedef = io.flatten(like)
    _check_like(directory, saved, like_flat, "the params")
    targets = {k: io.abstract_like(x) for k, x in like_flat.items()}
  arrays = io.restore_arrays(directory, targets)
  io.check_checksums(arrays, {k: s["checksum"] for k, s in saved.items()},
                     directory)
  if like is None:
    return io.nest({k: (jax.random.wrap_key_data(v, impl=meta["keys"][k])
                        if k in meta["keys"] else v)
                    for k, v in arrays.items()})
  return _rebuild(arrays, like_flat, treedef, meta["keys"])


# ----------------------------------------------------------------- training


def _check_run_directory(directory) -> None:
  """Refuses a CheckpointManager directory whose contents Orbax would
  mistake for steps (and delete), or that is a checkpoint itself."""
  if not directory.exists():
    return
  if not directory.is_dir():
    raise NotACheckpointError(
        f"CheckpointManager directory {directory} is a file; pass a"
        " directory path")
  names = _atomic_dir.entries(directory)
  if {"meta", "adapter_set.json", "adapter_config.json",
      io.MANIFEST} & set(names):
    raise NotACheckpointError(
        f"{directory} is itself a checkpoint (adapter, merged, adapter set or"
        " PEFT), not a CheckpointManager directory; pass another directory")
  strays = []
  for name in names:
    if not name.isdigit():
      continue  # Orbax's own tmp dirs, and other names, are not steps
    step = directory / name
    # Ours or Orbax's (any version): what a step of either holds.
    marks = {"_CHECKPOINT_METADATA", "commit_success.txt", "meta", "arrays",
             io.MANIFEST}
    if step.is_dir() and _atomic_dir.entries(step) and not (
        marks & set(_atomic_dir.entries(step))):
      strays.append(name)
  if strays:
    raise NotACheckpointError(
        f"{directory} holds {strays[:8]}, named like steps but not jlora"
        " training checkpoints; Orbax would list them as steps and"
        " max_to_keep would delete them. Fix: move them out, or give the"
        " CheckpointManager its own directory")


class Restored(NamedTuple):
  """What `CheckpointManager.restore` returns."""
  step: int
  trainable: Any
  opt_state: Any
  rng: Any
  extra: Any


class CheckpointManager:
  """Resumable LoRA training checkpoints over `orbax.checkpoint`.

  A thin wrapper of `orbax.checkpoint.CheckpointManager` (which can be used
  directly, e.g. with ``ocp.args.StandardSave(jlora.partition(lp)[0])``): it
  saves the adapter half of the params, the optax state, the step, a PRNG
  key (typed ``jax.random.key`` or raw) and JSON extras; restores them into
  the exact structure (``None`` leaves included) and shardings of `like`,
  and checks every restore against checksums and a file manifest. Saves
  run in the background unless ``async_save=False``; an interrupted save is
  never listed, the previous step stays restorable.

  The directory must hold only this manager's steps: a numbered entry that
  is not a jlora training step (Orbax would list it as a step and
  `max_to_keep` would delete it) raises `NotACheckpointError`, as does a
  directory that is itself a checkpoint. Saving a step at or before the
  latest saved one raises (Orbax would skip it silently).

  Examples:
    >>> with jlora.CheckpointManager("/tmp/run", max_to_keep=2) as ckpt:
    ...   ckpt.save(step, trainable=trainable, opt_state=opt_state, rng=rng)
    ...   r = ckpt.restore(like=(trainable, opt_state))
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep is not None:
      if (isinstance(max_to_keep, bool) or
          not isinstance(max_to_keep, numbers.Integral) or max_to_keep < 1):
        raise ValueError(
            f"max_to_keep={max_to_keep!r}: pass a positive int (0 would delete"
            " every checkpoint as soon as it is written), or None to keep"
            " all")
      max_to_keep = int(max_to_keep)
    self.directory = io.as_path(directory)
    _check_run_directory(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=io.ITEMS)
    self._async = async_save
    self._unmanifested: list[int] = []

  def _step_dir(self, step: int):
    return ocp.step.build_step_path(self.directory,
                                    ocp.step.standard_name_format(), step)

  def _write_manifests(self) -> None:
    steps = set(self.manager.all_steps())
    for step in self._unmanifested:
      if step in steps:  # not garbage-collected meanwhile
        io.write_manifest(self._step_dir(step))
    self._unmanifested = []

  def save(self, step: int, *, trainable: Any, opt_state: Any,
           rng: Any = None, extra: Any = None, force: bool = False) -> bool:
    """Saves a training step; returns whether a checkpoint was written.

    Args:
      step: the training step (an int).
      trainable: the adapter half, ``jlora.partition(lp)[0]``.
      opt_state: the optax state.
      rng: optional PRNG key to resume with.
      extra: optional JSON-serialisable record (data position, metrics...).
      force: save even if `step` is off the ``save_interval_steps`` grid.
    """
    latest = self.manager.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(
          f"step {step} is not after the latest checkpoint (step {latest}) in"
          f" {self.directory}; Orbax would skip this save. Fix: resume from"
          f" it (restore() gives step {latest}) and save later steps, or save"
          " a new run to another directory")
    if not force and not self.manager.should_save(step):
      return False
    if self._unmanifested:
      self.manager.wait_until_finished()
      self._write_manifests()
    arrays, impls, specs = {}, {}, {}
    for name, tree in (("trainable", trainable), ("opt_state", opt_state),
                       ("rng", None if rng is None else {"key": rng})):
      flat, _ = io.flatten(tree)
      raw, keys = io.to_savable(flat)
      arrays.update({f"{name}/{k}": x for k, x in raw.items()})
      impls.update({f"{name}/{k}": v for k, v in keys.items()})
      specs[name] = {k: io.spec(x) for k, x in raw.items()}
    sums = io.checksums(arrays)
    meta = {"format": TRAIN_FORMAT, "format_version": FORMAT_VERSION,
            "jlora_version": io.jlora_version(), "step": int(step),
            "extra": _json_value(extra, "extra"), "specs": specs,
            "keys": impls, "checksums": sums}
    saved = self.manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(io.nest(arrays)),
        meta=ocp.args.JsonSave(io.seal(meta))), force=force)
    if saved:
      self._unmanifested.append(step)
      if not self._async:
        self._write_manifests()
    return saved

  def restore(self, step: int | None = None, *, like: tuple[Any, Any]
              ) -> Restored:
    """Restores a step (default: the latest) into the structure of `like`.

    Args:
      step: which step; ``None`` for `latest_step`.
      like: ``(trainable, opt_state)`` built as for training (arrays or
        `jax.ShapeDtypeStruct`s); their structure, dtypes and shardings are
        those of the result.

    Raises:
      FileNotFoundError: no such step.
      CheckpointMismatchError: `like` differs from what was saved.
      CheckpointCorruptError: a damaged file (named).
    """
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available:"
          f" {list(self.all_steps())}")
    directory = self._step_dir(step)
    restore = lambda args: self.manager.restore(step, args=args)
    meta = io.open_checked(directory, restore=restore)
    targets, likes = {}, {}
    for name, tree in zip(("trainable", "opt_state"), like):
      like_flat, treedef = io.flatten(tree)
      _check_like(directory, meta["specs"][name], like_flat, name)
      likes[name] = (like_flat, treedef)
      targets.update({f"{name}/{k}": io.abstract_like(x)
                      for k, x in like_flat.items()})
    rng_spec = meta["specs"].get("rng", {})
    targets.update({f"rng/{k}": io.abstract(s["shape"], s["dtype"])
                    for k, s in rng_spec.items()})
    arrays = io.restore_arrays(directory, targets, restore)
    io.check_checksums(arrays, meta["checksums"], directory)
    out = {}
    for name, (like_flat, treedef) in likes.items():
      prefix = name + "/"
      out[name] = _rebuild(
          {k: arrays[prefix + k] for k in like_flat}, like_flat, treedef,
          {k[len(prefix):]: v for k, v in meta["keys"].items()
           if k.startswith(prefix)})
    rng = None
    if rng_spec:
      rng = arrays["rng/key"]
      if "rng/key" in meta["keys"]:
        rng = jax.random.wrap_key_data(rng, impl=meta["keys"]["rng/key"])
    return Restored(step, out["trainable"], out["opt_state"], rng,
                    meta["extra"])

  def latest_step(self) -> int | None:
    """The newest committed step (interrupted saves are never listed)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def wait_until_finished(self) -> None:
    """Blocks until a background save is committed (and its manifest)."""
    self.manager.wait_until_finished()
    self._write_manifests()

  def close(self) -> None:
    self.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
