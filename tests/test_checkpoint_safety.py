"""Checkpoints never lose data and never load something silently wrong.

Issue 21: an overwrite that deleted the user's directory, a failed save that
left nothing, two writers that left an unloadable directory, and an edited
record that loaded with another scale. Every check compares against the
arrays or bytes that were written before (bit-exact), or against the files
the user had.
"""

import dataclasses
import errno
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import _atomic_dir
from jlora import _checkpoint_io as io
from jlora.adapters import add_adapter, load_adapter_set, save_adapter_set
from jlora.checkpoint import (
    AdapterMismatchError, CheckpointCorruptError, CheckpointManager,
    NotACheckpointError, load_adapter, load_merged, read_metadata,
    save_adapter, save_merged)
from jlora.node import is_lora
from helpers import randomize_b

HERE = pathlib.Path(__file__).resolve().parent
LEGACY = HERE / "data" / "legacy_v1"


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="up")(x))
    return nn.Dense(4, name="down")(h)


def _params(seed=0):
  return MLP().init(jax.random.key(seed), jnp.ones((2, 8)))["params"]


def _lora(params, seed=1, **kw):
  lp = jlora.apply(params, rank=4, key=jax.random.key(seed), **kw)
  return randomize_b(lp, jax.random.key(seed + 1))


PARAMS = _params()


def _same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.dtype(g.dtype) == np.dtype(w.dtype)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(directory):
  """jlora's temporary and aside copies left beside `directory`."""
  d = pathlib.Path(directory)
  return sorted(p.name for p in d.parent.iterdir()
                if p.name.startswith(f".{d.name}.jlora-")
                and not p.name.endswith("-lock"))


def _user_dir(path):
  path.mkdir(parents=True)
  (path / "notes.txt").write_text("my results")
  (path / "sub").mkdir()
  (path / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
  return _snapshot(path)


# ------------------------------------------ 1. overwrite only what is ours


@pytest.mark.parametrize("saver", ["adapter", "merged", "set", "peft"])
def test_overwrite_never_deletes_a_user_directory(tmp_path, saver):
  lp = _lora(PARAMS)
  save = {
      "adapter": lambda p: save_adapter(p, lp, overwrite=True),
      "merged": lambda p: save_merged(p, lp, overwrite=True),
      "set": lambda p: save_adapter_set(p, add_adapter(PARAMS, "x", lp),
                                        overwrite=True),
      "peft": lambda p: jlora.peft.save(lp, p),
  }[saver]
  before = _user_dir(tmp_path / "mine")
  with pytest.raises(NotACheckpointError) as err:
    save(tmp_path / "mine")
  msg = str(err.value)
  assert str(tmp_path / "mine") in msg and "delete it yourself" in msg
  assert "another path" in msg
  assert _snapshot(tmp_path / "mine") == before
  assert _siblings(tmp_path / "mine") == []
  # A file at the path, or above it, is refused too, and kept.
  (tmp_path / "file").write_text("keep me")
  with pytest.raises(NotACheckpointError, match="is a file"):
    save(tmp_path / "file")
  with pytest.raises(NotACheckpointError, match="file.*is a file"):
    save(tmp_path / "file" / "sub")
  assert (tmp_path / "file").read_text() == "keep me"


def test_overwrite_never_replaces_another_kind(tmp_path):
  lp = _lora(PARAMS)
  save_merged(tmp_path / "m", lp)
  merged = load_merged(tmp_path / "m", like=PARAMS)
  with pytest.raises(NotACheckpointError, match="'jlora.merged' checkpoint"):
    save_adapter(tmp_path / "m", lp, overwrite=True)
  _same(load_merged(tmp_path / "m", like=PARAMS), merged)

  save_adapter_set(tmp_path / "s", add_adapter(PARAMS, "x", lp))
  with pytest.raises(NotACheckpointError, match="meta/metadata"):
    save_adapter(tmp_path / "s", lp, overwrite=True)
  save_adapter(tmp_path / "a", lp)
  with pytest.raises(NotACheckpointError, match="adapter_set.json"):
    save_adapter_set(tmp_path / "a", add_adapter(PARAMS, "x", lp),
                     overwrite=True)
  _same(load_adapter(tmp_path / "a", PARAMS), lp)
  _same(load_adapter_set(tmp_path / "s", PARAMS), add_adapter(PARAMS, "x", lp))


def test_user_file_inside_a_checkpoint_blocks_the_overwrite(tmp_path):
  lp = _lora(PARAMS)
  save_adapter(tmp_path / "a", lp)
  (tmp_path / "a" / "README.md").write_text("what this adapter does")
  with pytest.raises(NotACheckpointError, match=r"\['README.md'\]"):
    save_adapter(tmp_path / "a", _lora(PARAMS, seed=5), overwrite=True)
  assert (tmp_path / "a" / "README.md").read_text() == "what this adapter does"
  _same(load_adapter(tmp_path / "a", PARAMS), lp)

  save_adapter_set(tmp_path / "s", add_adapter(PARAMS, "x", lp))
  (tmp_path / "s" / "y").mkdir()
  with pytest.raises(NotACheckpointError, match=r"\['y'\]"):
    save_adapter_set(tmp_path / "s", add_adapter(PARAMS, "x", lp),
                     overwrite=True)
  assert (tmp_path / "s" / "y").is_dir()


def test_empty_directory_is_used_and_overwrite_replaces_ours(tmp_path):
  lp, lp2 = _lora(PARAMS), _lora(PARAMS, seed=7)
  (tmp_path / "a").mkdir()
  save_adapter(tmp_path / "a", lp)  # no overwrite needed: nothing to lose
  _same(load_adapter(tmp_path / "a", PARAMS), lp)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_adapter(tmp_path / "a", lp2)
  save_adapter(tmp_path / "a", lp2, overwrite=True)
  _same(load_adapter(tmp_path / "a", PARAMS), lp2)
  assert _siblings(tmp_path / "a") == []


def test_save_inside_another_checkpoint_is_refused(tmp_path):
  lp = _lora(PARAMS)
  save_adapter(tmp_path / "a", lp)
  before = _snapshot(tmp_path / "a")
  for inner in ("arrays/extra", "meta", "sub/dir"):
    with pytest.raises(NotACheckpointError, match="inside the jlora"):
      save_adapter(tmp_path / "a" / inner, lp, overwrite=True)
  with pytest.raises(NotACheckpointError, match="inside the jlora"):
    jlora.peft.save(lp, tmp_path / "a" / "peft")
  assert _snapshot(tmp_path / "a") == before
  _same(load_adapter(tmp_path / "a", PARAMS), lp)


# ------------------------------------------------------ 2. atomic replace


def _disk_full_midway(monkeypatch):
  """The next manifest write finds the disk full, after Orbax wrote (and
  half of an array file was cut off)."""
  real = io.write_manifest

  def full(directory):
    files = sorted((p for p in pathlib.Path(directory).rglob("*")
                    if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(files[-1], files[-1].stat().st_size // 2)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(io, "write_manifest", full)
  return real


@pytest.mark.parametrize("saver", ["adapter", "merged"])
def test_failed_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch,
                                                     saver):
  old, new = _lora(PARAMS), _lora(PARAMS, seed=9)
  path = tmp_path / "ckpt"
  if saver == "adapter":
    save, load = save_adapter, lambda: load_adapter(path, PARAMS)
    want = old
  else:
    save, load = save_merged, lambda: load_merged(path, like=PARAMS)
    want = jlora.merge(old)
  save(path, old)
  before = _snapshot(path)
  _disk_full_midway(monkeypatch)
  with pytest.raises(OSError, match="No space left"):
    save(path, new, overwrite=True)
  monkeypatch.undo()
  assert _snapshot(path) == before
  _same(load(), want)
  assert _siblings(path) == []  # the half-written copy is gone
  save(path, new, overwrite=True)  # and the next save works


def test_incomplete_copy_is_never_swapped_in(tmp_path, monkeypatch):
  # A write that "succeeds" but leaves a file short (a lying file system):
  # the check before the swap refuses it.
  old = _lora(PARAMS)
  save_adapter(tmp_path / "a", old)
  real = io.write_manifest

  def then_cut(directory):
    real(directory)
    victim = max((p for p in pathlib.Path(directory, "arrays").rglob("*")
                  if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(victim, 3)

  monkeypatch.setattr(io, "write_manifest", then_cut)
  with pytest.raises(OSError, match="not written whole"):
    save_adapter(tmp_path / "a", _lora(PARAMS, seed=3), overwrite=True)
  monkeypatch.undo()
  _same(load_adapter(tmp_path / "a", PARAMS), old)
  assert _siblings(tmp_path / "a") == []


def test_failed_swap_rename_puts_the_old_one_back(tmp_path, monkeypatch):
  old = _lora(PARAMS)
  save_adapter(tmp_path / "a", old)
  from etils import epath
  cls = type(epath.Path(os.fspath(tmp_path)))
  real_rename = cls.rename
  moves = []

  def rename(self, target):
    moves.append((self.name, epath.Path(target).name))
    if epath.Path(target).name == "a" and ".a.jlora-tmp-" in self.name:
      raise OSError(errno.EXDEV, "rename failed")  # the new copy moving in
    return real_rename(self, target)

  monkeypatch.setattr(cls, "rename", rename)
  with pytest.raises(OSError, match="rename failed"):
    save_adapter(tmp_path / "a", _lora(PARAMS, seed=3), overwrite=True)
  monkeypatch.undo()
  # The old copy had gone aside, and came back.
  assert [m for m in moves if m[0] == "a"][0][1].startswith(".a.jlora-old-")
  assert moves[-1][1] == "a" and moves[-1][0].startswith(".a.jlora-old-")
  _same(load_adapter(tmp_path / "a", PARAMS), old)
  assert _siblings(tmp_path / "a") == []


def test_failed_set_and_peft_saves_keep_the_old_ones(tmp_path, monkeypatch):
  old, new = _lora(PARAMS), _lora(PARAMS, seed=9)
  s_old = add_adapter(add_adapter(PARAMS, "x", old), "y", new)
  save_adapter_set(tmp_path / "s", s_old)
  jlora.peft.save(old, tmp_path / "p")
  (tmp_path / "p" / "README.md").write_text("model card")
  sets, pefts = _snapshot(tmp_path / "s"), _snapshot(tmp_path / "p")

  from jlora import checkpoint
  from jlora import _peft_config
  calls = []
  real = checkpoint.write_adapter

  def second_fails(*args, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kw)

  monkeypatch.setattr(checkpoint, "write_adapter", second_fails)
  monkeypatch.setattr(_peft_config, "write", lambda *a: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, "No space left on device")))
  with pytest.raises(OSError, match="No space"):
    save_adapter_set(tmp_path / "s", add_adapter(add_adapter(
        PARAMS, "x", new), "z", old), overwrite=True)
  with pytest.raises(OSError, match="No space"):
    jlora.peft.save(new, tmp_path / "p")
  monkeypatch.undo()
  assert _snapshot(tmp_path / "s") == sets
  assert _snapshot(tmp_path / "p") == pefts
  _same(load_adapter_set(tmp_path / "s", PARAMS), s_old)
  assert _siblings(tmp_path / "s") == [] and _siblings(tmp_path / "p") == []


def test_peft_save_replaces_its_files_and_keeps_the_others(tmp_path):
  old, new = _lora(PARAMS), _lora(PARAMS, seed=9)
  jlora.peft.save(old, tmp_path / "p")
  (tmp_path / "p" / "README.md").write_text("model card")
  (tmp_path / "p" / "other_adapter").mkdir()
  (tmp_path / "p" / "other_adapter" / "adapter_config.json").write_text("{}")
  jlora.peft.save(new, tmp_path / "p")
  assert (tmp_path / "p" / "README.md").read_text() == "model card"
  assert (tmp_path / "p" / "other_adapter" / "adapter_config.json"
          ).read_text() == "{}"
  back = jlora.peft.load(tmp_path / "p", PARAMS)
  for path in ("up", "down"):
    np.testing.assert_array_equal(np.asarray(back[path]["kernel"].b),
                                  np.asarray(new[path]["kernel"].b))


_CRASH_MID_SWAP = """
import sys, time
import jax
sys.path.insert(0, sys.argv[2])
import test_checkpoint_safety as t
from jlora import _atomic_dir
from jlora.checkpoint import save_adapter
real = _atomic_dir._swap
def slow_swap(tmp, target, kind):
  real_rename = type(target).rename
  def rename(self, to):
    real_rename(self, to)
    if ".jlora-old-" in to.name:  # the old copy is aside, the new not in
      print("ASIDE", flush=True)
      time.sleep(60)
  type(target).rename = rename
  real(tmp, target, kind)
_atomic_dir._swap = slow_swap
save_adapter(sys.argv[1], t._lora(t.PARAMS, seed=11), overwrite=True)
print("DONE", flush=True)
"""


def test_process_killed_mid_swap_then_load_and_save_work(tmp_path):
  # A real SIGKILL between the swap's two renames: no target, the old copy
  # aside, the dead writer's lock. The next load rolls back and loads the
  # old adapter; the next save is not blocked by the dead process's lock.
  old = _lora(PARAMS)
  save_adapter(tmp_path / "a", old)
  script = tmp_path / "child.py"
  script.write_text(_CRASH_MID_SWAP)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent),
                                                     str(HERE)]))
  child = subprocess.Popen(
      [sys.executable, str(script), str(tmp_path / "a"), str(HERE)], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    for line in child.stdout:
      if line.startswith("ASIDE"):
        os.kill(child.pid, signal.SIGKILL)
        break
  finally:
    child.kill()
    child.wait()
  assert child.returncode == -signal.SIGKILL
  assert not (tmp_path / "a").exists()
  assert any("jlora-old" in n for n in _siblings(tmp_path / "a"))
  _same(load_adapter(tmp_path / "a", PARAMS), old)
  new = _lora(PARAMS, seed=13)
  save_adapter(tmp_path / "a", new, overwrite=True)
  _same(load_adapter(tmp_path / "a", PARAMS), new)
  assert _siblings(tmp_path / "a") == []


def test_leftover_temporary_copies_are_cleaned(tmp_path):
  old = _lora(PARAMS)
  save_adapter(tmp_path / "a", old)
  junk = tmp_path / ".a.jlora-tmp-dead"
  (junk / "arrays").mkdir(parents=True)
  (junk / "arrays" / "half").write_bytes(b"\x00" * 10)
  (tmp_path / ".a.jlora-tmp-dead.orbax-checkpoint-tmp-1").mkdir()
  _same(load_adapter(tmp_path / "a", PARAMS), old)  # a load ignores them
  new = _lora(PARAMS, seed=3)
  save_adapter(tmp_path / "a", new, overwrite=True)  # the next save cleans
  assert _siblings(tmp_path / "a") == []
  _same(load_adapter(tmp_path / "a", PARAMS), new)


# ----------------------------------------------------- 3. concurrent saves


def _writer(path, who, rounds, barrier, results):
  params = _params()
  for r in range(rounds):
    overwrite = r < rounds - 1  # the last round: a fresh path, no overwrite
    target = path if overwrite else path + "-fresh"
    tree = _lora(params, seed=100 * r + 10 * who)
    barrier.wait()
    start = time.time()
    try:
      save_adapter(target, tree, overwrite=overwrite,
                   metadata={"writer": who, "round": r})
      results.put((r, who, "ok", start, time.time()))
    except Exception as e:  # pylint: disable=broad-except
      results.put((r, who, f"{type(e).__name__}: {e}", start, time.time()))
    barrier.wait()  # the parent checks the round in between
    barrier.wait()


def test_two_processes_saving_one_path(tmp_path):
  rounds = 4
  ctx = multiprocessing.get_context("spawn")
  barrier, results = ctx.Barrier(3), ctx.Queue()
  path = str(tmp_path / "a")
  save_adapter(path, _lora(PARAMS, seed=99))  # rounds 0-2 overwrite it
  procs = [ctx.Process(target=_writer, args=(path, who, rounds, barrier,
                                              results)) for who in (1, 2)]
  for p in procs:
    p.start()
  try:
    for r in range(rounds):
      barrier.wait(timeout=300)
      barrier.wait(timeout=300)
      got = {}
      for _ in range(2):
        rr, who, status, start, end = results.get(timeout=60)
        assert rr == r
        got[who] = (status, start, end)
      target = path if r < rounds - 1 else path + "-fresh"
      winner = read_metadata(target)["metadata"]["writer"]
      assert read_metadata(target)["metadata"]["round"] == r
      want = _lora(PARAMS, seed=100 * r + 10 * winner)
      _same(load_adapter(target, PARAMS), want)  # loadable, one writer's
      loser = 3 - winner
      status, _, end = got[loser]
      if r < rounds - 1:
        # Both saved whole, one after the other: the loser finished first.
        assert got[winner][0] == "ok" and status == "ok", got
        assert end <= got[winner][2], got
      else:
        assert got[winner][0] == "ok", got
        assert status.startswith("FileExistsError") and target in status, got
      assert _siblings(target) == []
      barrier.wait(timeout=300)
  finally:
    for p in procs:
      p.join(timeout=60)
      if p.is_alive():
        p.kill()
  assert all(p.exitcode == 0 for p in procs)


def test_loads_during_saves_see_whole_checkpoints(tmp_path):
  # Without the readers' lock a load that overlapped a swap read files of
  # two checkpoints (a checksum error); now it sees one or the other.
  params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}}
  trees = [jlora.apply(params, rank=2, key=jax.random.key(i))
           for i in range(3)]
  save_adapter(tmp_path / "a", trees[0])
  errors = []

  def writer():
    for i in range(6):
      try:
        save_adapter(tmp_path / "a", trees[i % 3], overwrite=True)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)

  thread = threading.Thread(target=writer)
  thread.start()
  loads = 0
  while thread.is_alive() or loads == 0:
    got = load_adapter(tmp_path / "a", params)
    loads += 1
    assert any(np.array_equal(got["d"]["kernel"].a, t["d"]["kernel"].a)
               and np.array_equal(got["d"]["kernel"].b, t["d"]["kernel"].b)
               for t in trees)
  thread.join()
  assert not errors, errors
  _same(load_adapter(tmp_path / "a", params), trees[5 % 3])


def test_a_writer_that_waits_too_long_gets_a_clear_error(tmp_path,
                                                         monkeypatch):
  import fcntl
  save_adapter(tmp_path / "a", _lora(PARAMS))
  fd = os.open(tmp_path / ".a.jlora-lock", os.O_RDWR)
  fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds it
  os.pwrite(fd, b"pid 4242 on elsewhere", 0)
  monkeypatch.setattr(_atomic_dir, "LOCK_TIMEOUT_S", 0.2)
  try:
    with pytest.raises(jlora.checkpoint.CheckpointBusyError) as err:
      save_adapter(tmp_path / "a", _lora(PARAMS, seed=5), overwrite=True)
  finally:
    os.close(fd)
  msg = str(err.value)
  assert str(tmp_path / "a") in msg and "pid 4242" in msg
  assert "another path" in msg


# ---------------------------------------------- 4. the record is checksummed


def _edit_record(directory, edit, *, keep_manifest=False):
  if not keep_manifest:
    (pathlib.Path(directory) / "jlora_manifest.json").unlink()
  record = pathlib.Path(directory) / "meta" / "metadata"
  meta = json.loads(record.read_text())
  edit(meta)
  record.write_text(json.dumps(meta))
  return record


@pytest.mark.parametrize("field,value", [
    ("alpha", 64.0), ("rslora", True), ("layout", "oi"), ("rank", 2),
    ("dropout", 0.5), ("class", "jlora.node.LoRA")])
def test_edited_static_field_is_named(tmp_path, field, value):
  # Issue 21: alpha/rslora edited with the manifest gone loaded with scale
  # 45.3 instead of 1.0. Every static field is now covered.
  params = {"blk": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
  lp = jlora.apply(params, rank=4, alpha=4.0, key=jax.random.key(1))
  assert lp["blk"]["kernel"].scale == 1.0
  save_adapter(tmp_path / "a", lp)

  def edit(meta):
    rec = meta["targets"]["blk/kernel"]
    rec[field] = value if rec[field] != value else "jlora.node.Other"

  record = _edit_record(tmp_path / "a", edit)
  with pytest.raises(CheckpointCorruptError) as err:
    load_adapter(tmp_path / "a", params)
  msg = str(err.value)
  assert f"targets['blk/kernel']['{field}'] was changed" in msg
  assert str(record) in msg and "save it again" in msg


def test_other_record_edits_are_caught(tmp_path):
  lp = _lora(PARAMS)
  cases = {
      "base shape": lambda m: m["base"]["up/kernel"].update(shape=[8, 16]),
      "user metadata": lambda m: m["metadata"].update(task="other"),
      "field removed": lambda m: m["targets"]["up/kernel"].pop("dropout"),
      "field added": lambda m: m["targets"]["up/kernel"].update(extra=1),
      "digests removed": lambda m: m.pop("integrity"),
      "version downgraded": lambda m: (m.pop("integrity"),
                                       m.update(format_version=1)),
  }
  for name, edit in cases.items():
    d = tmp_path / name.replace(" ", "_")
    save_adapter(d, lp, metadata={"task": "sst2"})
    _edit_record(d, edit)
    with pytest.raises(CheckpointCorruptError, match="meta/metadata"):
      load_adapter(d, PARAMS)
    with pytest.raises(CheckpointCorruptError):
      read_metadata(d)
  # With the manifest present, its CRC32 names the edited file first.
  save_adapter(tmp_path / "m", lp)
  record = _edit_record(tmp_path / "m", lambda m: m["targets"]["up/kernel"]
                        .update(alpha=1.0), keep_manifest=True)
  with pytest.raises(CheckpointCorruptError, match=str(record)):
    load_adapter(tmp_path / "m", PARAMS)


def test_training_and_set_records_are_checksummed(tmp_path):
  trainable, _ = jlora.partition(_lora(PARAMS))
  opt = optax.adam(1e-3)
  with CheckpointManager(tmp_path / "run", async_save=False) as ckpt:
    ckpt.save(1, trainable=trainable, opt_state=opt.init(trainable),
              rng=jax.random.key(3), extra={"epoch": 1})
  _edit_record(tmp_path / "run" / "1",
               lambda m: m["keys"].update({"rng/key": "rbg"}))
  with CheckpointManager(tmp_path / "run") as ckpt:
    with pytest.raises(CheckpointCorruptError, match=r"keys\['rng/key'\]"):
      ckpt.restore(like=(trainable, opt.init(trainable)))

  s = add_adapter(add_adapter(PARAMS, "x", _lora(PARAMS)), "y",
                  _lora(PARAMS, seed=4))
  save_adapter_set(tmp_path / "s", jlora.set_active(s, "x"))
  index = tmp_path / "s" / "adapter_set.json"
  data = json.loads(index.read_text())
  data["active"] = "y"
  index.write_text(json.dumps(data))
  with pytest.raises(CheckpointCorruptError, match=r"active.*changed"):
    load_adapter_set(tmp_path / "s", PARAMS)
  index.write_text("{not json")
  with pytest.raises(CheckpointCorruptError, match="adapter_set.json"):
    load_adapter_set(tmp_path / "s", PARAMS)


def test_checkpoints_written_before_the_digests_still_load(tmp_path):
  # tests/data/legacy_v1 was written by jlora at commit 4e62736 (format
  # version 1: no digests, no base checksums) from the trees built here
  # (adapter: _lora(PARAMS, alpha=8.0); run: step 7 of its trainable half,
  # sgd state, key(5), extra {"epoch": 1}). Its manifest covers the record.
  shutil.copytree(LEGACY, tmp_path / "v1")
  lp = _lora(PARAMS, alpha=8.0)
  assert read_metadata(tmp_path / "v1" / "adapter")["format_version"] == 1
  _same(load_adapter(tmp_path / "v1" / "adapter", PARAMS), lp)
  trainable, _ = jlora.partition(lp)
  opt = optax.sgd(0.1)
  with CheckpointManager(tmp_path / "v1" / "run") as ckpt:
    r = ckpt.restore(like=(trainable, opt.init(trainable)))
  assert (r.step, r.extra) == (7, {"epoch": 1})
  _same(r.trainable, trainable)
  np.testing.assert_array_equal(jax.random.key_data(r.rng),
                                jax.random.key_data(jax.random.key(5)))
  # Without its manifest nothing verifies an old record: a clear error.
  (tmp_path / "v1" / "adapter" / "jlora_manifest.json").unlink()
  with pytest.raises(CheckpointCorruptError, match="older jlora"):
    load_adapter(tmp_path / "v1" / "adapter", PARAMS)
  # Overwriting an old checkpoint is allowed (it is recognisably ours).
  save_adapter(tmp_path / "v1" / "adapter", lp, overwrite=True)
  _same(load_adapter(tmp_path / "v1" / "adapter", PARAMS), lp)


# ------------------------------------------ 5. damaged or partial directories


def test_damaged_or_partial_checkpoints_are_named(tmp_path):
  lp = _lora(PARAMS)

  def fresh(name):
    save_adapter(tmp_path / name, lp)
    return tmp_path / name

  d = fresh("no_meta")
  (d / "meta" / "metadata").unlink()
  with pytest.raises(CheckpointCorruptError, match="meta/metadata: missing"):
    load_adapter(d, PARAMS)
  d = fresh("no_meta_no_manifest")
  (d / "jlora_manifest.json").unlink()
  (d / "meta" / "metadata").unlink()
  with pytest.raises(CheckpointCorruptError, match="save this one again"):
    load_adapter(d, PARAMS)
  d = fresh("garbage_meta")
  (d / "jlora_manifest.json").unlink()
  (d / "meta" / "metadata").write_text("[1, 2")
  with pytest.raises(CheckpointCorruptError, match=str(d)):
    load_adapter(d, PARAMS)
  d = fresh("no_arrays")
  (d / "jlora_manifest.json").unlink()
  shutil.rmtree(d / "arrays")
  with pytest.raises(CheckpointCorruptError, match="arrays"):
    load_adapter(d, PARAMS)
  d = fresh("bad_manifest")
  (d / "jlora_manifest.json").write_text("{")
  with pytest.raises(CheckpointCorruptError, match="jlora_manifest.json"):
    load_adapter(d, PARAMS)

  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty directory"):
    load_adapter(tmp_path / "empty", PARAMS)
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    load_adapter(tmp_path / "nothing", PARAMS)
  (tmp_path / "f").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file"):
    load_adapter(tmp_path / "f", PARAMS)
  jlora.peft.save(lp, tmp_path / "peft")
  with pytest.raises(FileNotFoundError, match="jlora.peft.load"):
    load_adapter(tmp_path / "peft", PARAMS)
  save_adapter_set(tmp_path / "set", add_adapter(PARAMS, "x", lp))
  with pytest.raises(FileNotFoundError, match="load_adapter_set"):
    load_adapter(tmp_path / "set", PARAMS)


# ---------------------------------------------------- 6. a skeptical user


def test_symlinked_path_keeps_pointing_at_the_checkpoint(tmp_path):
  old, new = _lora(PARAMS), _lora(PARAMS, seed=5)
  save_adapter(tmp_path / "run3", old)
  (tmp_path / "latest").symlink_to(tmp_path / "run3")
  _same(load_adapter(tmp_path / "latest", PARAMS), old)
  save_adapter(tmp_path / "latest", new, overwrite=True)
  assert (tmp_path / "latest").is_symlink()
  _same(load_adapter(tmp_path / "run3", PARAMS), new)
  _same(load_adapter(tmp_path / "latest", PARAMS), new)
  # Copied or moved, a checkpoint still loads (the manifest is relative).
  shutil.copytree(tmp_path / "run3", tmp_path / "copy")
  shutil.move(tmp_path / "run3", tmp_path / "moved")
  _same(load_adapter(tmp_path / "copy", PARAMS), new)
  _same(load_adapter(tmp_path / "moved", PARAMS), new)
  (tmp_path / "latest").unlink()
  # A link to nowhere: the save creates what it points to.
  (tmp_path / "dangling").symlink_to(tmp_path / "later")
  save_adapter(tmp_path / "dangling", old)
  _same(load_adapter(tmp_path / "later", PARAMS), old)


def test_relative_and_unicode_paths(tmp_path, monkeypatch):
  lp = _lora(PARAMS)
  monkeypatch.chdir(tmp_path)
  save_adapter("rel/a", lp)
  _same(load_adapter("./rel/../rel/a", PARAMS), lp)
  save_adapter("rel/a/", _lora(PARAMS, seed=3), overwrite=True)
  _same(load_adapter(tmp_path / "rel" / "a", PARAMS), _lora(PARAMS, seed=3))
  odd = tmp_path / "adaptér ü" / "检查点 #1"
  save_adapter(odd, lp)
  save_adapter(odd, lp, overwrite=True)
  _same(load_adapter(odd, PARAMS), lp)
  # The working directory itself (with the user's files) is never replaced.
  (tmp_path / "mine.txt").write_text("x")
  with pytest.raises(NotACheckpointError):
    save_adapter(".", lp, overwrite=True)
  assert (tmp_path / "mine.txt").read_text() == "x"


def test_adapter_onto_another_model_of_the_same_shapes(tmp_path):
  lp = _lora(PARAMS)
  save_adapter(tmp_path / "a", lp)
  other = _params(seed=42)  # same architecture, other weights
  with pytest.raises(AdapterMismatchError) as err:
    load_adapter(tmp_path / "a", other)
  msg = str(err.value)
  assert "'up/kernel': expected values with checksum" in msg
  assert "allow_other_base=True" in msg
  assert {p for p, _, _ in err.value.mismatches} == {"up/kernel",
                                                     "down/kernel"}
  got = load_adapter(tmp_path / "a", other, allow_other_base=True)
  np.testing.assert_array_equal(np.asarray(got["up"]["kernel"].w),
                                np.asarray(other["up"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(got["up"]["kernel"].b),
                                np.asarray(lp["up"]["kernel"].b))
  # One changed element of one kernel is enough.
  nudged = jax.tree.map(lambda x: x, PARAMS)
  nudged["down"]["kernel"] = PARAMS["down"]["kernel"].at[3, 1].add(1e-6)
  with pytest.raises(AdapterMismatchError, match="'down/kernel'"):
    load_adapter(tmp_path / "a", nudged)
  # A base donated to a jitted step has no values left to checksum: the
  # save still works (as before) and records shape and dtype only.
  gone = jax.tree.map(jnp.copy, PARAMS)
  jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(gone)
  assert gone["up"]["kernel"].is_deleted()
  lp_gone = jax.tree.map(lambda n: dataclasses.replace(n, w=gone["up"]["kernel"])
                         if is_lora(n) and n.path == "up/kernel" else n, lp,
                         is_leaf=is_lora)
  save_adapter(tmp_path / "g", lp_gone)
  assert "checksum" not in read_metadata(tmp_path / "g")["base"]["up/kernel"]
  assert "checksum" in read_metadata(tmp_path / "g")["base"]["down/kernel"]
  _same(load_adapter(tmp_path / "g", PARAMS)["up"], lp["up"])


def test_qlora_adapter_loads_onto_the_unquantized_base(tmp_path):
  # Like with like: the adapter of a quantized base is meant to be merged
  # into the plain one (QLoRA); another quantized base is refused.
  params = {"blk": {"kernel": jax.random.normal(jax.random.key(0), (64, 64),
                                                jnp.bfloat16)}}
  q = jlora.quantize(params, "nf4")
  lp = randomize_b(jlora.apply(q, rank=2, key=jax.random.key(1)),
                   jax.random.key(2))
  save_adapter(tmp_path / "a", lp)
  got = load_adapter(tmp_path / "a", params)
  np.testing.assert_array_equal(np.asarray(got["blk"]["kernel"].b),
                                np.asarray(lp["blk"]["kernel"].b))
  q_other = jlora.quantize(jax.tree.map(lambda x: -x, params), "nf4")
  with pytest.raises(AdapterMismatchError, match="values"):
    load_adapter(tmp_path / "a", q_other)


def test_manager_never_deletes_what_it_did_not_write(tmp_path):
  t, _ = jlora.partition(_lora(PARAMS))
  opt = optax.sgd(0.1)
  run = tmp_path / "run"
  (run / "1").mkdir(parents=True)
  (run / "1" / "my.txt").write_text("not a step")
  with pytest.raises(NotACheckpointError, match=r"\['1'\].*max_to_keep"):
    CheckpointManager(run, max_to_keep=1)
  assert (run / "1" / "my.txt").read_text() == "not a step"
  with pytest.raises(ValueError, match="max_to_keep=0"):
    CheckpointManager(tmp_path / "other", max_to_keep=0)
  # A numbered file is not a step to Orbax: it is left alone.
  (tmp_path / "run3").mkdir()
  (tmp_path / "run3" / "7").write_text("kept")
  with CheckpointManager(tmp_path / "run3", max_to_keep=np.int64(1),
                         async_save=False) as ckpt:
    for step in (8, 9):
      ckpt.save(step, trainable=t, opt_state=opt.init(t))
    assert ckpt.all_steps() == [9]
  assert (tmp_path / "run3" / "7").read_text() == "kept"
  save_adapter(tmp_path / "adapter", _lora(PARAMS))
  with pytest.raises(NotACheckpointError, match="itself a checkpoint"):
    CheckpointManager(tmp_path / "adapter")

  # A restarted run that counts from 0 again in the old run's directory:
  # Orbax would skip every save and keep the old steps; jlora says so.
  with CheckpointManager(tmp_path / "run2", async_save=False) as ckpt:
    for step in (10, 20):
      ckpt.save(step, trainable=t, opt_state=opt.init(t))
  t2 = jax.tree.map(lambda x: x + 1, t)
  with CheckpointManager(tmp_path / "run2", async_save=False) as ckpt:
    with pytest.raises(ValueError, match="step 5 is not after.*step 20"):
      ckpt.save(5, trainable=t2, opt_state=opt.init(t2))
    with pytest.raises(ValueError, match="step 20 is not after"):
      ckpt.save(20, trainable=t2, opt_state=opt.init(t2), force=True)
    assert ckpt.all_steps() == [10, 20]
    _same(ckpt.restore(like=(t, opt.init(t))).trainable, t)


def test_manager_step_without_manifest_or_half_written(tmp_path):
  t, _ = jlora.partition(_lora(PARAMS))
  t2 = jax.tree.map(lambda x: x * 2, t)
  opt = optax.sgd(0.1)
  with CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trainable=t, opt_state=opt.init(t))
    ckpt.save(2, trainable=t2, opt_state=opt.init(t2))
  # Killed between Orbax's commit and the manifest: the digests still hold.
  (tmp_path / "2" / "jlora_manifest.json").unlink()
  with CheckpointManager(tmp_path) as ckpt:
    _same(ckpt.restore(like=(t, opt.init(t))).trainable, t2)
  # Its record cut short: named, and step 1 still restores.
  record = tmp_path / "2" / "meta" / "metadata"
  record.write_bytes(record.read_bytes()[:40])
  with CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(CheckpointCorruptError, match=str(tmp_path / "2")):
      ckpt.restore(like=(t, opt.init(t)))
    _same(ckpt.restore(1, like=(t, opt.init(t))).trainable, t)
