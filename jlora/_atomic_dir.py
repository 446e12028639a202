"""Crash-safe replacement of a checkpoint directory, under a writer lock.

A save never writes into its target. It writes a hidden sibling
``.<name>.jlora-tmp-<token>``, checks it, then swaps it in with two renames
(the old directory aside to ``.<name>.jlora-old-<token>``, the new one in)
and only then deletes the old one. Until the first rename the old checkpoint
is untouched, so any failure of the new save (full disk, a crash, a bug)
leaves it loadable; a crash between the two renames is rolled back by the
next save or load of the target (the writer never reported success).

An existing target is replaced only when `Kind.recognize` says it is a
checkpoint of the same kind; an empty directory is used as if absent.
Anything else (a file, a directory holding the user's files, a checkpoint of
another kind, a path inside another jlora checkpoint) raises
`NotACheckpointError`, naming the path and the fix.

Writers of one target hold an exclusive `fcntl.flock` on
``.<name>.jlora-lock`` beside it for the whole save; loads hold a shared one
while they read (when that file exists). So two processes saving one path
run one after the other (the second sees the first's checkpoint: with
``overwrite=False`` it raises `FileExistsError`, with ``overwrite=True`` it
replaces it), and a reader never sees half a swap. Waiting longer than
`LOCK_TIMEOUT_S` raises `CheckpointBusyError`. The kernel drops a flock when
its process dies, so a crash never leaves a stale lock; the empty lock file
stays beside the checkpoint (deleting it safely is not possible). Locks are
for local file systems; remote paths (``gs://``) get the write-aside and
swap, without a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from typing import Callable, Iterator

from etils import epath

from jlora import _peft_config

LOCK_TIMEOUT_S = 600.0
MANIFEST = "jlora_manifest.json"
# Top-level entries of an Orbax composite checkpoint written by jlora
# (a manifest may list more, for Orbax versions that add files).
CHECKPOINT_ENTRIES = frozenset({"arrays", "meta", "_CHECKPOINT_METADATA",
                                "commit_success.txt", MANIFEST})
_SIDECAR = re.compile(r"\..+\.jlora-(lock|tmp-.*|old-.*)")
_LEFTOVER_MANIFEST = re.compile(re.escape(f".{MANIFEST}.") + r"[0-9a-f]+\.tmp")


class NotACheckpointError(FileExistsError):
  """A save's target exists and is not a checkpoint of the kind it writes."""


class CheckpointBusyError(TimeoutError):
  """Another process held a checkpoint's lock for longer than the timeout."""


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a directory must be for a save to replace it.

  recognize(directory) -> None when it is a checkpoint of this kind, else a
    phrase saying what it is ("holds files jlora did not write: [...]").
  verify(directory) raises when a freshly written copy is incomplete.
  keep_foreign: names other than those the save writes are carried over
    into the new directory (hard links), not refused: a PEFT directory may
    hold a README or another adapter next to the two files jlora writes.
  """
  what: str
  recognize: Callable[[epath.Path], str | None]
  verify: Callable[[epath.Path], None] = lambda directory: None
  keep_foreign: bool = False


def is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def resolve(path) -> epath.Path:
  """An absolute path; local symlinks resolved, so a save through a link
  replaces the directory it points to and the link keeps pointing at it."""
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.realpath(os.path.abspath(text)))


def entries(directory: epath.Path) -> list[str]:
  """Names in `directory`, leaving out jlora's lock and temporary siblings."""
  return sorted(p.name for p in directory.iterdir()
                if not _SIDECAR.fullmatch(p.name))


# -------------------------------------------------------- checkpoint kinds


def read_json(path: epath.Path) -> dict | None:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  return value if isinstance(value, dict) else None


def foreign_entries(directory: epath.Path) -> list[str]:
  """Names in a checkpoint directory that jlora and Orbax did not write."""
  manifest = read_json(directory / MANIFEST) or {}
  known = CHECKPOINT_ENTRIES | set(manifest.get("top", []))
  return [n for n in entries(directory)
          if n not in known and not _LEFTOVER_MANIFEST.fullmatch(n)]


def recognize_checkpoint(directory: epath.Path, fmt: str) -> str | None:
  """None when `directory` is a jlora checkpoint of format `fmt`."""
  meta = read_json(directory / "meta" / "metadata")
  if meta is None:
    return "is not a jlora checkpoint (no readable meta/metadata record)"
  found = meta.get("format")
  if found != fmt:
    return f"holds a '{found}' checkpoint, not a '{fmt}' one"
  foreign = foreign_entries(directory)
  if foreign:
    return f"holds entries jlora did not write: {foreign[:8]}"
  return None


def verify_checkpoint(directory: epath.Path, fmt: str) -> None:
  """A freshly written checkpoint: its manifest's files at their sizes."""
  manifest = read_json(directory / MANIFEST)
  problem = recognize_checkpoint(directory, fmt)
  if manifest is None:
    problem = f"has no readable {MANIFEST}"
  else:
    for rel, (size, _) in manifest.get("files", {}).items():
      p = directory / rel
      if not p.exists() or p.stat().length != size:
        problem = f"file {p} was not written whole"
        break
  if problem:
    raise OSError(errno.EIO, f"the checkpoint just written to {directory}"
                  f" {problem}")


def _recognize_peft(directory: epath.Path) -> str | None:
  names = entries(directory)
  if not {_peft_config.CONFIG_NAME, _peft_config.WEIGHTS_NAME} & set(names):
    return (f"holds no PEFT adapter ({_peft_config.CONFIG_NAME} /"
            f" {_peft_config.WEIGHTS_NAME}) but other files: {names[:8]}")
  return None


def _verify_peft(directory: epath.Path) -> None:
  for name in (_peft_config.CONFIG_NAME, _peft_config.WEIGHTS_NAME):
    if not (directory / name).exists():
      raise OSError(errno.EIO, f"{directory / name} was not written")
  if read_json(directory / _peft_config.CONFIG_NAME) is None:
    raise OSError(errno.EIO, f"{directory / _peft_config.CONFIG_NAME} is not"
                  " a JSON object")


PEFT = Kind("a PEFT adapter directory", _recognize_peft, _verify_peft,
            keep_foreign=True)


def inside_checkpoint(path: epath.Path) -> epath.Path | None:
  """The jlora checkpoint that `path` would be written into, if any."""
  if not is_local(path):
    return None
  for parent in path.parents:
    if (parent / MANIFEST).exists() or (
        (parent / "meta" / "metadata").exists() and (parent / "arrays").exists()):
      return parent
  return None


# ------------------------------------------------------------------- locks


def _lock_path(target: epath.Path) -> str:
  return os.fspath(target.parent / f".{target.name}.jlora-lock")


def _flock(fd: int, mode: int, target: epath.Path, what: str) -> None:
  deadline = time.monotonic() + LOCK_TIMEOUT_S
  while True:
    try:
      fcntl.flock(fd, mode | fcntl.LOCK_NB)
      return
    except BlockingIOError:
      if time.monotonic() > deadline:
        try:
          holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
          holder = ""
        raise CheckpointBusyError(
            f"{target} is being written by another process"
            f"{' (' + holder + ')' if holder else ''}; waited"
            f" {LOCK_TIMEOUT_S:.0f} s to {what} it (lock file"
            f" {_lock_path(target)}). Fix: let that save finish, or save to"
            " another path") from None
      time.sleep(0.02)


@contextlib.contextmanager
def _writer_lock(target: epath.Path) -> Iterator[None]:
  if not is_local(target):
    yield
    return
  fd = os.open(_lock_path(target), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    _flock(fd, fcntl.LOCK_EX, target, "write")
    os.ftruncate(fd, 0)  # who holds it, for the busy error of others
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def _pending_swap(target: epath.Path) -> bool:
  prefix = f".{target.name}.jlora-old-"
  return (target.parent.exists()
          and any(p.name.startswith(prefix) for p in target.parent.iterdir()))


@contextlib.contextmanager
def reading(path) -> Iterator[epath.Path]:
  """Holds the target's lock shared while it is read; first finishes (rolls
  back) a swap that a crashed writer left half done."""
  target = resolve(path)
  if not is_local(target):
    yield target
    return
  try:
    fd = os.open(_lock_path(target), os.O_RDONLY)
  except OSError:  # never written by this jlora, or unreadable: no lock
    fd = None
  try:
    if _pending_swap(target):
      if fd is None:
        fd = os.open(_lock_path(target), os.O_RDWR | os.O_CREAT, 0o644)
      _flock(fd, fcntl.LOCK_EX, target, "repair")
      recover(target)
    elif fd is not None:
      _flock(fd, fcntl.LOCK_SH, target, "read")
    yield target
  finally:
    if fd is not None:
      os.close(fd)


def recover(target: epath.Path) -> None:
  """Cleans up after crashed saves of `target`; call holding its lock.

  A crash between the swap's two renames left no target and the old copy
  aside: it goes back (the crashed save never returned). Temporary copies
  and already-replaced old copies are deleted.
  """
  parent = target.parent
  if not parent.exists():
    return
  for p in sorted(parent.iterdir(), key=lambda p: p.name):
    if p.name.startswith(f".{target.name}.jlora-old-"):
      if not target.exists():
        p.rename(target)
      else:
        _remove(p)
  for p in parent.iterdir():
    if p.name.startswith(f".{target.name}.jlora-tmp-"):
      _remove(p)


def _remove(p: epath.Path) -> None:
  if p.is_dir() and not os.path.islink(os.fspath(p)):
    p.rmtree()
  else:
    p.unlink()


# ----------------------------------------------------------------- replace


def _refusal(target: epath.Path, kind: Kind, why: str) -> NotACheckpointError:
  return NotACheckpointError(
      f"{target} {why}; refusing to replace it with {kind.what}. Fix: save"
      " to another path, or delete it yourself if you no longer need it")


def check_target(target: epath.Path, kind: Kind, overwrite: bool) -> None:
  """Raises unless a save of `kind` may write `target`."""
  if not target.exists():
    return
  if not target.is_dir():
    raise _refusal(target, kind, "is a file")
  if not list(target.iterdir()):
    return
  why = kind.recognize(target)
  if why is not None:
    raise _refusal(target, kind, why)
  if not overwrite:
    raise FileExistsError(
        f"{target} already holds {kind.what}; pass overwrite=True to replace"
        " it, or choose another path")


def precheck(target: epath.Path, kind: Kind, overwrite: bool) -> None:
  """`check_target`, plus: a real name, not inside another checkpoint."""
  if target.name in ("", ".", "..") or target.parent == target:
    raise NotACheckpointError(f"cannot save to {target}: name a directory")
  for parent in target.parents:
    if parent.exists():
      if not parent.is_dir():
        raise NotACheckpointError(
            f"cannot save to {target}: {parent} is a file. Fix: save to a"
            " path under a directory")
      break
  outer = inside_checkpoint(target)
  if outer is not None:
    raise NotACheckpointError(
        f"{target} is inside the jlora checkpoint {outer}; saving there would"
        " change that checkpoint. Fix: save to a path outside it")
  check_target(target, kind, overwrite)


def _carry_over(old: epath.Path, new: epath.Path) -> None:
  """Hard-links (or copies) entries of `old` that `new` lacks into `new`."""
  for name in entries(old):
    src, dst = os.fspath(old / name), os.fspath(new / name)
    if os.path.lexists(dst):
      continue
    if os.path.isdir(src) and not os.path.islink(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst, follow_symlinks=False)


def _link_or_copy(src: str, dst: str, *, follow_symlinks: bool = True) -> None:
  if os.path.islink(src):
    os.symlink(os.readlink(src), dst)
    return
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst, follow_symlinks=follow_symlinks)


@contextlib.contextmanager
def replace_dir(path, kind: Kind, *, overwrite: bool = True,
                token: str | None = None, primary: bool = True
                ) -> Iterator[epath.Path]:
  """Yields a fresh temporary directory to write; swaps it in on success.

  Args:
    path: the target directory.
    kind: what the target must be to be replaced (see `Kind`).
    overwrite: replace an existing checkpoint of `kind` (else
      `FileExistsError`).
    token: the temporary directory's suffix; the same on every process of a
      multi-host save (default: random).
    primary: this process checks, locks and swaps (process 0); the others
      only write into the yielded directory.

  Raises:
    NotACheckpointError: the target is something else (named, with the fix).
    FileExistsError: a checkpoint is there and `overwrite` is False.
    CheckpointBusyError: another writer held the lock too long.
  """
  target = resolve(path)
  tmp = target.parent / f".{target.name}.jlora-tmp-{token or uuid.uuid4().hex}"
  if not primary:
    yield tmp
    return
  precheck(target, kind, overwrite)  # fail before any work
  target.parent.mkdir(parents=True, exist_ok=True)
  with _writer_lock(target):
    if is_local(target):
      recover(target)
    check_target(target, kind, overwrite)  # may have changed while waiting
    try:
      yield tmp
      if not tmp.exists():
        raise OSError(errno.EIO, f"nothing was written to {tmp}")
      kind.verify(tmp)
      _swap(tmp, target, kind)
    except BaseException:
      for p in target.parent.iterdir():  # ours and Orbax's own tmp dir
        if p.name.startswith(tmp.name):
          _remove(p)
      raise


def _swap(tmp: epath.Path, target: epath.Path, kind: Kind) -> None:
  if not target.exists():
    tmp.rename(target)
    return
  if not list(target.iterdir()):
    target.rmdir()
    tmp.rename(target)
    return
  if kind.keep_foreign:
    _carry_over(target, tmp)
  old = target.parent / (".%s.jlora-old-%s" % (target.name, uuid.uuid4().hex))
  target.rename(old)
  try:
    tmp.rename(target)
  except BaseException:
    old.rename(target)
    raise
  _remove(old)
