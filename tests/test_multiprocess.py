"""Multi-process training through jax.distributed: 2 CPU processes vs 1.

Both runs use a 4-device mesh 'data:2,fsdp:2' (two processes with 2 devices
each, or one process with 4) and the same global batches; each process of
the 2-process run feeds only its own rows. Losses, saved adapters and saved
training state must agree, and a checkpoint written by either run must
restore in the other.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess") / "train_worker.py"
ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(out, nproc, other=None, timeout=600):
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}"
             f"{os.environ.get('PYTHONPATH', '')}")
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  args = [str(out), "data:2,fsdp:2"] + ([str(other)] if other else [])
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(nproc), port, *args],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(nproc)]
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return json.loads((out / "losses.json").read_text())


def test_two_processes_match_one(tmp_path):
  one = tmp_path / "one"
  two = tmp_path / "two"
  one.mkdir()
  two.mkdir()
  single = _run(one, 1)
  multi = _run(two, 2, other=one)  # restores the 1-process checkpoint
  assert single["processes"] == 1 and multi["processes"] == 2
  assert single["devices"] == multi["devices"] == 4
  assert multi["losses"] == pytest.approx(single["losses"], rel=1e-6)
  assert single["losses"][-1] < single["losses"][0]
  assert single["restored_equal"] and multi["restored_equal"]
  assert multi["other_equal"] is True
  # The adapter was written once: one file set, identical to the 1-process one.
  a1 = sorted(p.relative_to(one / "adapter").as_posix()
              for p in (one / "adapter").rglob("*") if p.is_file())
  a2 = sorted(p.relative_to(two / "adapter").as_posix()
              for p in (two / "adapter").rglob("*") if p.is_file())
  assert [p for p in a1 if "process_" not in p and "/d/" not in p] == [
      p for p in a2 if "process_" not in p and "/d/" not in p]
  # And the 2-process checkpoint restores in one process.
  back = tmp_path / "back"
  back.mkdir()
  assert _run(back, 1, other=two)["other_equal"] is True
