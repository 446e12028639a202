"""Orbax plumbing for `jlora.checkpoint`: flat trees, checksums, manifests.

A jlora checkpoint is an Orbax composite checkpoint with two items: ``arrays``
(a nested dict of arrays, `ocp.args.StandardSave`) and ``meta`` (a JSON
record, `ocp.args.JsonSave`), so plain Orbax reads it too. Three integrity
layers sit on top of Orbax's atomic tmp-dir-and-rename commit:

- every array's checksum is in ``meta``, written in the same commit as the
  arrays and checked after each restore (end to end, sharded arrays
  included);
- a file manifest (``jlora_manifest.json``: size and CRC32 of every file of
  both items), written right after the commit, checked before reading, so
  a damaged file is named before any of it is decoded;
- a digest of every field of ``meta`` itself (``meta["integrity"]``: the
  static configuration, fingerprints, shapes and checksums), so an edited
  record is caught even without the manifest.

A save writes beside its target and swaps it in (`jlora._atomic_dir`); a
load holds the target's reader lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
import zlib
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jlora import _atomic_dir
from jlora._paths import key_str

MANIFEST = _atomic_dir.MANIFEST
ITEMS = ("arrays", "meta")


class CheckpointCorruptError(OSError):
  """A checkpoint's files are damaged, truncated or incomplete."""


class CheckpointMismatchError(ValueError):
  """Arrays of a checkpoint do not fit the tree they are restored into.

  ``mismatches`` lists ``(path, expected, found)`` triples.
  """

  def __init__(self, message: str, mismatches=()):
    super().__init__(message)
    self.mismatches = list(mismatches)


def as_path(path: Any) -> epath.Path:
  """An absolute `epath.Path` (Orbax needs absolute local paths); local
  symlinks resolved."""
  return _atomic_dir.resolve(path)


reading = _atomic_dir.reading


# ------------------------------------------------------------------- trees


def flatten(tree: Any) -> tuple[dict[str, Any], Any]:
  """``({'a/b/0': leaf}, treedef)``; ``None`` stays part of the treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {}
  for path, leaf in leaves:
    key = "/".join(key_str(k) for k in path)
    if key in flat:
      raise ValueError(
          f"two leaves share the path '{key}' (keys that differ only in"
          " type, e.g. 0 and '0'); rename one before checkpointing")
    flat[key] = leaf
  return flat, treedef


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}: the layout Orbax writes and lists."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, last = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def unnest(nested: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(nested, dict):
    return {prefix: nested}
  out = {}
  for k, v in nested.items():
    out.update(unnest(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def spec(x: Any) -> dict[str, Any]:
  return {"shape": [int(s) for s in x.shape], "dtype": np.dtype(x.dtype).name}


def to_savable(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
  """Typed PRNG keys become their raw uint32 data; returns (arrays, impls)."""
  arrays, impls = {}, {}
  for k, x in flat.items():
    if is_key(x):
      impls[k] = str(jax.random.key_impl(x))
      x = jax.random.key_data(x)
    elif not isinstance(x, (jax.Array, np.ndarray)):
      x = np.asarray(x)
    arrays[k] = x
  return arrays, impls


def default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def abstract(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype),
                              sharding=sharding or default_sharding())


def abstract_like(x: Any) -> jax.ShapeDtypeStruct:
  """Target of a restore shaped, typed and sharded like `x`."""
  if is_key(x):
    x = jax.eval_shape(jax.random.key_data, x) if not isinstance(
        x, jax.Array) else jax.random.key_data(x)
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.Sharding):
    sharding = None
  if not hasattr(x, "shape"):
    x = np.asarray(x)
  return abstract(x.shape, x.dtype, sharding)


# --------------------------------------------------------------- checksums


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (a trailing axis of 2 for 64-bit)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
  size = np.dtype(x.dtype).itemsize
  if size not in unsigned or np.dtype(x.dtype).kind == "c":
    x, size = x.astype(jnp.float32), 4
  return jax.lax.bitcast_convert_type(x, unsigned[size]).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every element, built without a reshape (which
  a sharded operand may not allow)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit flips ~half the output."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@jax.jit
def _fingerprint(x: jax.Array) -> jax.Array:
  # Sums of hashed (word, position) pairs in wrapping uint32 arithmetic:
  # exact and independent of reduction order, so a sharded array gives the
  # same value on any mesh without being gathered to one host.
  w = _words(x)
  i = _positions(w.shape)
  return jnp.stack([
      jnp.sum(_mix(w ^ _mix(i ^ jnp.uint32(seed))), dtype=jnp.uint32)
      for seed in (0x9E3779B9, 0x7F4A7C15)])


@jax.jit
def _fingerprints(xs: list) -> list:
  # One program for every array: with several processes, each array's sum
  # is a collective, and one program keeps them in one order everywhere.
  return [_fingerprint(x) for x in xs]


def checksums(arrays: dict[str, Any]) -> dict[str, str]:
  """{key: 16 hex digits} fingerprints of raw (non-key) arrays."""
  keys = list(arrays)
  try:
    # This process's own CPU device: host arrays are hashed on the host.
    cpu = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    cpu = None
  groups: dict[Any, list[str]] = {}  # one program per set of devices
  placed = {}
  for k in keys:
    x = arrays[k]
    if not isinstance(x, jax.Array):
      x = jax.device_put(np.asarray(x), cpu)
    placed[k] = x
    devices = tuple(sorted(d.id for d in x.sharding.device_set))
    groups.setdefault(devices, []).append(k)
  values = {}
  for group in groups.values():
    values.update(zip(group, jax.device_get(_fingerprints(
        [placed[k] for k in group]))))
  return {k: "%08x%08x" % (int(values[k][0]), int(values[k][1]))
          for k in keys}


def check_checksums(arrays: dict[str, Any], expected: dict[str, str],
                    directory: epath.Path, item: str = "arrays") -> None:
  found = checksums({k: arrays[k] for k in expected if k in arrays})
  bad = [k for k in expected if k in found and found[k] != expected[k]]
  if bad:
    raise CheckpointCorruptError(
        f"checkpoint {directory} is corrupt: array(s) {bad[:8]} restored from"
        f" the files under {directory / item} do not match the checksums"
        " recorded when they were saved; restore an earlier checkpoint or"
        " save this one again")


# ---------------------------------------------------------------- manifest


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _walk(root: epath.Path) -> Iterable[epath.Path]:
  for p in sorted(root.iterdir()):
    if p.is_dir():
      yield from _walk(p)
    else:
      yield p


def _files(directory: epath.Path) -> Iterable[epath.Path]:
  for item in ITEMS:
    if (directory / item).exists():
      yield from _walk(directory / item)


def write_manifest(directory: epath.Path) -> None:
  """Records size and CRC32 of every file of the checkpoint's items."""
  if jax.process_index() != 0:
    return
  files = {os.fspath(p.relative_to(directory)): [p.stat().length, _crc32(p)]
           for p in _files(directory)}
  # Every top-level name, so an overwrite knows what is jlora's to replace.
  top = sorted({p.name for p in directory.iterdir()} | {MANIFEST})
  tmp = directory / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
  tmp.write_text(json.dumps({"files": files, "top": top}, indent=1,
                            sort_keys=True))
  tmp.rename(directory / MANIFEST)  # atomic: the manifest is whole or absent


def verify_manifest(directory: epath.Path) -> bool:
  """Raises `CheckpointCorruptError` naming each damaged file.

  Returns False when the checkpoint has no manifest (a save interrupted
  between Orbax's commit and the manifest; the checksums still apply).
  """
  path = directory / MANIFEST
  if not path.exists():
    return False
  try:
    files = json.loads(path.read_text())["files"]
  except (ValueError, KeyError) as e:
    raise CheckpointCorruptError(
        f"{path} is unreadable ({e}); restore an earlier checkpoint or save"
        " this one again") from e
  problems = []
  for rel, (size, crc) in sorted(files.items()):
    p = directory / rel
    if not p.exists():
      problems.append(f"{p}: missing (expected {size} bytes)")
      continue
    found = p.stat().length
    if found != size:
      problems.append(f"{p}: {found} bytes, expected {size} (truncated or"
                      " overwritten)")
    elif _crc32(p) != crc:
      problems.append(f"{p}: CRC32 {_crc32(p):08x}, expected {crc:08x}"
                      " (contents changed)")
  if problems:
    raise CheckpointCorruptError(
        f"checkpoint {directory} is corrupt:\n  " + "\n  ".join(problems) +
        "\nrestore an earlier checkpoint or save this one again")
  return True


def corrupt(directory: epath.Path, what: str,
            error: BaseException) -> CheckpointCorruptError:
  """Wraps an Orbax/TensorStore read failure, naming the file it names."""
  text = str(error)
  cause = error.__cause__ or error.__context__
  if cause is not None:
    text += " " + str(cause)
  named = re.findall(r'(?:local )?file "([^"]+)"', text)
  inner = re.findall(r'Error reading "([^"]+)"', text)
  where = named[-1] if named else str(directory / what)
  detail = f" (entry '{inner[0]}')" if inner else ""
  first = next((line for line in text.splitlines() if line.strip()), text)
  return CheckpointCorruptError(
      f"cannot read {what} of checkpoint {directory}: file {where}{detail} is"
      f" damaged or truncated: {first[:300]}; restore an earlier checkpoint or"
      " save this one again")


# --------------------------------------------------------------- integrity


def _record_fields(meta: dict[str, Any]) -> dict[tuple, Any]:
  """The record's values by key path, four levels deep (e.g.
  ``("targets", "up/kernel", "alpha")``); deeper values are taken whole."""
  out: dict[tuple, Any] = {}

  def visit(path: tuple, value: Any) -> None:
    if isinstance(value, dict) and value and len(path) < 4:
      for k, v in value.items():
        visit(path + (k,), v)
    else:
      out[path] = value

  for k, v in meta.items():
    if k != "integrity":
      visit((k,), v)
  return out


def _digest(path: tuple, value: Any) -> str:
  text = json.dumps([list(path), value], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def seal(meta: dict[str, Any]) -> dict[str, Any]:
  """`meta` as JSON will store it, plus a digest of each of its fields."""
  meta = json.loads(json.dumps(meta))  # the types a reader will see
  meta["integrity"] = [[list(p), _digest(p, v)]
                       for p, v in sorted(_record_fields(meta).items())]
  return meta


def _field_name(path) -> str:
  return path[0] + "".join(f"[{k!r}]" for k in path[1:])


def check_seal(meta: dict[str, Any], directory: epath.Path,
               has_manifest: bool, record: epath.Path | None = None) -> None:
  """Raises `CheckpointCorruptError` naming each field of the record that
  differs from what was saved.

  A record without digests is from jlora before format_version 2: accepted
  when the file manifest (whose CRC32 covers the record) was verified.
  """
  record = record or directory / "meta" / "metadata"
  if "integrity" not in meta:
    if meta.get("format_version", 1) >= 2:
      raise CheckpointCorruptError(
          f"{record} lacks its 'integrity' digests, so its fields (alpha,"
          " rank, layout, shapes, checksums...) cannot be trusted; restore"
          " an earlier copy of this checkpoint or save it again")
    if not has_manifest:
      raise CheckpointCorruptError(
          f"checkpoint {directory} was written by an older jlora"
          f" (format_version {meta.get('format_version')}) and has no"
          f" {MANIFEST}, so nothing verifies its record {record} (alpha,"
          " rank, layout...); save it again with this jlora from the tree"
          " it came from, or restore its manifest")
    return
  try:
    saved = {tuple(p): d for p, d in meta["integrity"]}
  except (TypeError, ValueError) as e:
    raise CheckpointCorruptError(
        f"{record}: its 'integrity' entry is malformed ({e}); restore an"
        " earlier copy of this checkpoint or save it again") from e
  found = _record_fields(meta)
  problems = [f"{_field_name(p)} was changed" for p, v in found.items()
              if p in saved and saved[p] != _digest(p, v)]
  problems += [f"{_field_name(p)} was added" for p in found if p not in saved]
  problems += [f"{_field_name(p)} was removed" for p in saved
               if p not in found]
  if problems:
    raise CheckpointCorruptError(
        f"checkpoint {directory} is corrupt: its record {record} differs from"
        " the one saved:\n  " + "\n  ".join(problems[:20]) +
        "\nrestore an earlier copy of this checkpoint or save it again (do"
        " not edit the record: a changed alpha or layout would load an"
        " adapter that computes something else)")


# ------------------------------------------------------------ orbax calls


def checkpoint_kind(fmt: str, what: str) -> _atomic_dir.Kind:
  return _atomic_dir.Kind(
      f"{what} checkpoint",
      lambda d: _atomic_dir.recognize_checkpoint(d, fmt),
      lambda d: _atomic_dir.verify_checkpoint(d, fmt))


@contextlib.contextmanager
def saving(path: Any, kind: _atomic_dir.Kind, *, overwrite: bool):
  """Yields a fresh directory to write a checkpoint into; on success it
  replaces `path` atomically (see `jlora._atomic_dir`).

  Multi-host: every process writes (Orbax coordinates the arrays); process
  0 checks the target, holds the lock and swaps.
  """
  if jax.process_count() == 1:
    with _atomic_dir.replace_dir(path, kind, overwrite=overwrite) as tmp:
      yield tmp
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  primary = jax.process_index() == 0
  target = _atomic_dir.resolve(path)
  refused = None
  if primary:
    try:
      _atomic_dir.precheck(target, kind, overwrite)
    except Exception as e:  # pylint: disable=broad-except  (tell the others)
      refused = e
  token = np.frombuffer(uuid.uuid4().bytes, np.uint32)
  token = np.asarray(multihost_utils.broadcast_one_to_all(
      np.append(token, np.uint32(refused is not None))))
  if refused is not None:
    raise refused
  if token[-1]:
    raise FileExistsError(f"process 0 refused to save to {target}; see its"
                          " error")
  name = "".join(f"{int(w):08x}" for w in token[:-1])
  with _atomic_dir.replace_dir(path, kind, overwrite=overwrite, token=name,
                               primary=primary) as tmp:
    yield tmp
  multihost_utils.sync_global_devices(f"jlora save {target}")


def write_checkpoint(directory: epath.Path, arrays: dict[str, Any],
                     meta: dict[str, Any]) -> None:
  """One Orbax commit of both items into a new directory, then the manifest."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(nest(arrays)),
        meta=ocp.args.JsonSave(seal(meta))))
  write_manifest(directory)


def describe(directory: epath.Path) -> OSError | None:
  """The error for a directory that is not a jlora checkpoint, naming what
  it is instead; None when it may be one."""
  def no(cls, why):
    return cls(f"no jlora checkpoint at {directory}: it {why}")

  if not directory.exists():
    return None  # read_meta says so
  if not directory.is_dir():
    return no(NotADirectoryError, "is a file, not a checkpoint directory")
  names = _atomic_dir.entries(directory)
  if "meta" in names:
    return None
  if not names:
    return no(FileNotFoundError, "is an empty directory")
  if "adapter_set.json" in names:
    return no(FileNotFoundError, "is a jlora adapter set; read it with"
              " jlora.load_adapter_set")
  if "adapter_config.json" in names:
    return no(FileNotFoundError, "is a PEFT adapter; read it with"
              " jlora.peft.load")
  steps = [n for n in names if n.isdigit()]
  if steps:
    return no(FileNotFoundError, f"looks like a CheckpointManager directory"
              f" (steps {steps[:8]}); read it with"
              " jlora.CheckpointManager(path).restore")
  return no(FileNotFoundError, f"holds only {names[:8]}")


def open_checked(directory: epath.Path, fmt: str | None = None,
                 what: str = "", hint: str = "", restore=None
                 ) -> dict[str, Any]:
  """Verifies the file manifest, reads the metadata, checks its digests and
  its format.

  Raises:
    FileNotFoundError / NotADirectoryError: nothing, or no checkpoint, there.
    CheckpointCorruptError: a damaged file or an edited record (named).
    ValueError: the checkpoint's format is not `fmt` ("not `what`; `hint`").
  """
  if restore is None:
    problem = describe(directory)
    if problem is not None:
      raise problem
  has_manifest = verify_manifest(directory)
  meta = read_meta(directory, restore)
  check_seal(meta, directory, has_manifest)
  if fmt is not None and meta.get("format") != fmt:
    raise ValueError(f"{directory} holds a '{meta.get('format')}' checkpoint,"
                     f" not {what}; {hint}")
  return meta


def read_meta(directory: epath.Path, restore=None) -> dict[str, Any]:
  if not directory.exists():
    raise FileNotFoundError(f"no checkpoint at {directory}")
  try:
    if restore is None:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
    else:
      out = restore(ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out["meta"]
  except Exception as e:  # Orbax raises many types for an unreadable file.
    raise corrupt(directory, "meta", e) from e
  if not isinstance(meta, dict) or "format" not in meta:
    raise CheckpointCorruptError(
        f"{directory / 'meta'} holds no jlora metadata record; was this"
        " checkpoint written by jlora?")
  return meta


def restore_arrays(directory: epath.Path, targets: dict[str, Any],
                   restore=None) -> dict[str, Any]:
  """Restores `targets` ({key: ShapeDtypeStruct}) into their shardings."""
  args = ocp.args.Composite(arrays=ocp.args.StandardRestore(nest(targets)))
  try:
    if restore is None:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=args)
    else:
      out = restore(args)
  except Exception as e:
    raise corrupt(directory, "arrays", e) from e
  return unnest(out["arrays"])


def jlora_version() -> str:
  import jlora  # pylint: disable=import-outside-toplevel
  return getattr(jlora, "__version__", "unknown")
