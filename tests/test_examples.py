"""examples/finetune_causal_lm.py end to end, as a subprocess, tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import jlora
import jlora.peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune_causal_lm.py")


def run_example(out, *flags, devices=1):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  result = subprocess.run(
      [sys.executable, SCRIPT, "--out", str(out), *flags], env=env,
      capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  return result


def load_example():
  spec = importlib.util.spec_from_file_location("finetune_causal_lm", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_finetune_causal_lm_learns_and_writes_files(tmp_path):
  result = run_example(tmp_path, "--steps", "80", "--batch", "8",
                       "--seq-len", "64", "--eval-every", "40",
                       "--eval-batches", "2", "--sample-tokens", "16")
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  # A random byte-level model starts near log(256) = 5.5 nats per byte.
  assert metrics["loss_before"] > 5.0
  assert metrics["loss_after"] < metrics["loss_before"] - 1.5, metrics
  assert "--- sample" in result.stdout and "perplexity" in result.stdout
  assert "tok_s=" in result.stderr  # the tqdm bar
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    assert (tmp_path / "adapter_peft" / name).is_file()
  assert (tmp_path / "adapter_orbax").is_dir()
  try:
    import matplotlib  # noqa: F401
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
  except ImportError:
    assert "skipping the loss-curve PNG" in result.stdout

  # Both adapter files hold the same trained adapter for the demo's base.
  example = load_example()
  _, params = jlora.models.from_config(example.TOY_CONFIG, jax.random.key(0))
  from_orbax = jlora.load_adapter(str(tmp_path / "adapter_orbax"), params)
  from_peft = jlora.peft.load(tmp_path / "adapter_peft", params)
  for x, y in zip(jax.tree.leaves(from_orbax), jax.tree.leaves(from_peft)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_finetune_causal_lm_on_a_mesh(tmp_path):
  result = run_example(tmp_path, "--steps", "3", "--batch", "4",
                       "--seq-len", "32", "--eval-batches", "1",
                       "--sample-tokens", "2", "--mesh", "fsdp:2,model:2",
                       devices=4)
  assert "after:" in result.stdout
  assert (tmp_path / "adapter_peft" / "adapter_model.safetensors").is_file()


def _run_small(name, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "examples", name), *flags], env=env,
      capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  return result.stdout


def test_quickstart_example_learns_and_keeps_base():
  out = _run_small("quickstart.py", "--steps", "150")
  first, last = (float(v) for v in re.search(
      r"loss ([0-9.e+-]+) -> ([0-9.e+-]+)", out).groups())
  assert last < first / 5
  assert "base weights unchanged: True" in out


def test_checkpointing_example_round_trips():
  out = _run_small("checkpointing.py")
  assert "restored adapter reproduces the outputs bit for bit" in out
  # 22 layers x r=16 x (q,k,v,o: 2048+2048, 2048+256 twice, ...) in bf16.
  h, i, kv, r, layers = 2048, 5632, 256, 16, 22
  per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
  expected_mb = layers * per_layer * 2 / 1e6
  reported = float(re.search(r"bf16: ([0-9.]+) MB", out).group(1))
  assert abs(reported - expected_mb) < 0.1


def test_multi_adapter_example_mixes_adapters_per_example():
  pytest.importorskip("evosax")  # its LoRAHub step; an optional extra
  out = _run_small("multi_adapter.py", "--steps", "150")
  diffs = re.findall(r"(base|A|B) +\d+ examples, max \|difference\| (\S+)",
                     out)
  assert [d[0] for d in diffs] == ["base", "A", "B"]
  assert all(float(d[1]) < 1e-5 for d in diffs)
  # Each trained adapter fits its own task far better than the bare base.
  rows = {m[0].strip(): [float(v) for v in m[1:]] for m in re.findall(
      r"^(base \(no adapter\)|adapter A|adapter B) +(\S+) +(\S+) +(\S+)$", out,
      re.M)}
  assert rows["adapter A"][0] < rows["base (no adapter)"][0] / 5
  assert rows["adapter B"][1] < rows["base (no adapter)"][1] / 5
