"""Orbax plumbing for `jlora.checkpoint`: flat trees, checksums, manifests.

A jlora checkpoint is an Orbax composite checkpoint with two items: ``arrays``
(a nested dict of arrays, `ocp.args.StandardSave`) and ``meta`` (a JSON
record, `ocp.args.JsonSave`), so plain Orbax reads it too. Two integrity
layers sit on top of Orbax's atomic tmp-dir-and-rename commit:

- every array's checksum is in ``meta``, written in the same commit as the
  arrays and checked after each restore (end to end, sharded arrays
  included);
- a file manifest (``jlora_manifest.json``: size and CRC32 of every file of
  both items), written right after the commit, checked before reading, so
  a damaged file is named before any of it is decoded.
"""

from __future__ import annotations

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

from jlora._paths import key_str

MANIFEST = "jlora_manifest.json"
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
  """An absolute `epath.Path` (Orbax needs absolute local paths)."""
  text = os.fspath(path)
  if "://" not in text:
    text = os.path.abspath(text)
  return epath.Path(text)


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


def checksums(arrays: dict[str, Any]) -> dict[str, str]:
  """{key: 16 hex digits} fingerprints of raw (non-key) arrays."""
  keys = list(arrays)
  values = jax.device_get([_fingerprint(jnp.asarray(arrays[k])
                                        if not isinstance(arrays[k], jax.Array)
                                        else arrays[k]) for k in keys])
  return {k: "%08x%08x" % (int(v[0]), int(v[1])) for k, v in zip(keys, values)}


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
  tmp = directory / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
  tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
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
    raise CheckpointCorruptError(f"{path} is unreadable ({e})") from e
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


# ------------------------------------------------------------ orbax calls


def composite_save(directory: epath.Path, arrays: dict[str, Any],
                   meta: dict[str, Any], *, force: bool) -> None:
  """One atomic Orbax commit of both items, then the manifest."""
  if directory.exists() and not force:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True"
                          " to replace it or choose another path")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(nest(arrays)),
        meta=ocp.args.JsonSave(meta)), force=force)
  write_manifest(directory)


def open_checked(directory: epath.Path, fmt: str | None = None,
                 what: str = "", hint: str = "", restore=None
                 ) -> dict[str, Any]:
  """Verifies the file manifest, reads the metadata and checks its format.

  Raises:
    ValueError: the checkpoint's format is not `fmt` ("not `what`; `hint`").
  """
  verify_manifest(directory)
  meta = read_meta(directory, restore)
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
  except FileNotFoundError:
    raise
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
