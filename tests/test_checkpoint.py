"""Adapter, merged and training checkpoints: round trips, validation, safety.

Every comparison is against the arrays that were saved (or an uninterrupted
run), with `np.testing.assert_array_equal`: bit-exact, never self-referential.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jlora
from jlora import _checkpoint_io as io
from jlora.checkpoint import (
    AdapterMismatchError, CheckpointCorruptError, CheckpointManager,
    CheckpointMismatchError, load_adapter, load_merged, read_metadata,
    save_adapter, save_merged)
from jlora.node import is_lora
from helpers import randomize_b

KEY = jax.random.key(0)
HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="up")(x))
    return nn.Dense(4, name="down")(h)


def _params(dtype=jnp.float32):
  params = MLP().init(KEY, jnp.ones((2, 8)))["params"]
  return jax.tree.map(lambda x: x.astype(dtype), params)


def _lora(params, **kw):
  lp = jlora.apply(params, rank=kw.pop("rank", 4), key=jax.random.key(1), **kw)
  return randomize_b(lp, jax.random.key(2))


def _assert_same_tree(got, want):
  """Same structure (static fields included) and bit-identical leaves."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.dtype(g.dtype) == np.dtype(w.dtype)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _files(directory):
  return sorted(p for p in pathlib.Path(directory).rglob("*") if p.is_file())


def _du(directory):
  return sum(p.stat().st_size for p in _files(directory))


# --------------------------------------------------------------- round trips


@settings(max_examples=6, deadline=None)
@given(fan_in=st.integers(2, 9), fan_out=st.integers(2, 9),
       stacked=st.sampled_from([(), (3,)]), rank=st.integers(1, 2),
       dtype=st.sampled_from(["float32", "bfloat16"]),
       adapter_dtype=st.sampled_from([None, "bfloat16"]),
       rslora=st.booleans())
def test_adapter_round_trip_is_bit_exact(tmp_path_factory, fan_in, fan_out,
                                         stacked, rank, dtype, adapter_dtype,
                                         rslora):
  shape = (*stacked, fan_in, fan_out)
  params = {"blk": {"kernel": jax.random.normal(KEY, shape, dtype),
                    "bias": jnp.ones((fan_out,), dtype)}}
  lp = _lora(params, rank=rank, alpha=3.0, dtype=adapter_dtype, rslora=rslora)
  path = tmp_path_factory.mktemp("adapter") / "ckpt"
  save_adapter(path, lp)
  _assert_same_tree(load_adapter(path, params), lp)


def test_optional_fields_and_metadata(tmp_path):
  params = _params()
  lp = _lora(params, targets="up", alpha=8.0)
  node = lp["up"]["kernel"]
  lp["up"]["kernel"] = dataclasses.replace(
      node, e=jnp.arange(1.0, 5.0), m=jnp.linspace(0.5, 1.5, 32),
      dropout=0.1)
  save_adapter(tmp_path / "a", lp, metadata={"task": "demo", "epoch": 3})
  _assert_same_tree(load_adapter(tmp_path / "a", params), lp)

  meta = read_metadata(tmp_path / "a")
  assert meta["format"] == "jlora.adapter"
  assert meta["jlora_version"] == jlora.__version__
  assert meta["metadata"] == {"task": "demo", "epoch": 3}
  rec = meta["targets"]["up/kernel"]
  assert (rec["rank"], rec["alpha"], rec["layout"], rec["rslora"],
          rec["dropout"], rec["path"]) == (4, 8.0, "io", False, 0.1,
                                           "up/kernel")
  assert {k: (v["shape"], v["dtype"]) for k, v in rec["fields"].items()} == {
      "a": ([8, 4], "float32"), "b": ([4, 32], "float32"),
      "e": ([4], "float32"), "m": ([32], "float32")}
  checksum = meta["base"]["up/kernel"].pop("checksum")
  assert meta["base"] == {"up/kernel": {"shape": [8, 32], "dtype": "float32"}}
  assert len(checksum) == 16 and int(checksum, 16) >= 0
  with pytest.raises(TypeError, match="JSON"):
    save_adapter(tmp_path / "b", lp, metadata={"bad": object()})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_adapter(tmp_path / "a", lp)
  save_adapter(tmp_path / "a", _lora(params, targets="up"), overwrite=True)
  assert "e" not in read_metadata(tmp_path / "a")["targets"]["up/kernel"][
      "fields"]


def test_adapter_never_writes_the_base(tmp_path):
  # 4 kernels of 1024 x 1024 (16 MiB of base), r=16 adapters (512 KiB).
  params = {f"l{i}": {"kernel": jnp.zeros((1024, 1024))} for i in range(4)}
  lp = _lora(params, rank=16)
  adapter_bytes = sum(x.nbytes for n in jax.tree.leaves(lp, is_leaf=is_lora)
                      for x in (n.a, n.b))
  save_adapter(tmp_path / "a", lp)
  size = _du(tmp_path / "a")
  assert size < adapter_bytes * 1.1 + 64 * 1024, (size, adapter_bytes)
  assert size < 16 * 2**20 / 10


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merged_round_trip(tmp_path, dtype):
  params = _params(dtype)
  lp = _lora(params)
  want = jlora.merge(lp)
  save_merged(tmp_path / "m", lp)
  _assert_same_tree(load_merged(tmp_path / "m", like=params), want)
  plain = load_merged(tmp_path / "m")  # nested dicts, as saved
  _assert_same_tree(plain, jax.tree.map(np.asarray, dict(want)))
  assert plain["up"]["kernel"].dtype == dtype
  with pytest.raises(ValueError, match="not an adapter"):
    load_adapter(tmp_path / "m", params)


# ---------------------------------------------------------------- validation


def test_missing_path_and_subset_opt_in(tmp_path):
  params = _params()
  lp = _lora(params)
  save_adapter(tmp_path / "a", lp)
  subset = {"up": params["up"]}
  with pytest.raises(AdapterMismatchError) as err:
    load_adapter(tmp_path / "a", subset)
  msg = str(err.value)
  assert "'down/kernel'" in msg and "no such path" in msg
  assert "allow_missing=True" in msg
  assert err.value.mismatches[0][0] == "down/kernel"
  got = load_adapter(tmp_path / "a", subset, allow_missing=True)
  _assert_same_tree(got, {"up": lp["up"]})


def test_shape_and_dtype_mismatches_are_listed_together(tmp_path):
  params = _params()
  save_adapter(tmp_path / "a", _lora(params))
  wrong = {"up": {"kernel": jnp.zeros((8, 16)), "bias": params["up"]["bias"]},
           "down": jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                params["down"])}
  with pytest.raises(AdapterMismatchError) as err:
    load_adapter(tmp_path / "a", wrong, allow_missing=True)
  msg = str(err.value)
  assert "'up/kernel': expected shape (8, 32), found shape (8, 16)" in msg
  assert "'down/kernel': expected dtype float32, found dtype bfloat16" in msg
  assert "trained on another model" in msg and "astype" in msg
  assert len(err.value.mismatches) == 2


def test_superset_of_targets_opt_in(tmp_path):
  params = _params()
  lp_up = _lora(params, targets="up")
  save_adapter(tmp_path / "a", lp_up)
  # A fresh LoRA tree over every kernel: 'down' is not in the adapter.
  fresh = jlora.apply(params, rank=4, key=jax.random.key(9))
  with pytest.raises(AdapterMismatchError, match="allow_extra=True"):
    load_adapter(tmp_path / "a", fresh)
  got = load_adapter(tmp_path / "a", fresh, allow_extra=True)
  _assert_same_tree(got["up"], lp_up["up"])
  _assert_same_tree(got["down"], fresh["down"])


def test_training_like_mismatch(tmp_path):
  lp = _lora(_params())
  trainable, _ = jlora.partition(lp)
  opt_state = optax.adam(1e-3).init(trainable)
  with CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trainable=trainable, opt_state=opt_state)
    other, _ = jlora.partition(_lora(_params(), rank=2))
    with pytest.raises(CheckpointMismatchError, match="same targets, ranks"):
      ckpt.restore(like=(other, optax.adam(1e-3).init(other)))
    with pytest.raises(FileNotFoundError, match="available"):
      ckpt.restore(7, like=(trainable, opt_state))


# -------------------------------------------------------------------- safety


def _largest_array_file(directory):
  return max((p for p in _files(pathlib.Path(directory) / "arrays")),
             key=lambda p: p.stat().st_size)


def test_truncated_file_is_named(tmp_path):
  params = _params()
  lp = _lora(params)
  save_adapter(tmp_path / "a", lp)
  victim = _largest_array_file(tmp_path / "a")
  os.truncate(victim, victim.stat().st_size // 2)
  with pytest.raises(CheckpointCorruptError, match=str(victim)):
    load_adapter(tmp_path / "a", params)


def test_corruption_caught_without_manifest(tmp_path):
  # Without the file manifest (a save interrupted right after Orbax's
  # commit), TensorStore's errors and the checksums still catch damage.
  params = _params()
  save_adapter(tmp_path / "a", _lora(params))
  (tmp_path / "a" / "jlora_manifest.json").unlink()
  victim = _largest_array_file(tmp_path / "a")
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  with pytest.raises(CheckpointCorruptError):
    load_adapter(tmp_path / "a", params)
  os.truncate(victim, 10)
  with pytest.raises(CheckpointCorruptError):
    load_adapter(tmp_path / "a", params)


def test_checksums_catch_values_that_differ(tmp_path):
  # Intact files whose values differ from those saved (forged here by
  # editing the recorded checksum and sealing the record again): the
  # end-to-end check refuses them.
  params = _params()
  save_adapter(tmp_path / "a", _lora(params))
  (tmp_path / "a" / "jlora_manifest.json").unlink()
  record = tmp_path / "a" / "meta" / "metadata"
  meta = json.loads(record.read_text())
  del meta["integrity"]
  meta["targets"]["down/kernel"]["fields"]["b"]["checksum"] = "0" * 16
  record.write_text(json.dumps(io.seal(meta)))
  with pytest.raises(CheckpointCorruptError, match="down/kernel/b"):
    load_adapter(tmp_path / "a", params)


def test_manager_corrupt_step_refused_previous_restores(tmp_path):
  lp = _lora(_params())
  t1, _ = jlora.partition(lp)
  t2 = jax.tree.map(lambda x: x + 1, t1)
  opt = optax.sgd(0.1)
  with CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trainable=t1, opt_state=opt.init(t1))
    ckpt.save(2, trainable=t2, opt_state=opt.init(t2))
  victim = _largest_array_file(tmp_path / "2")
  os.truncate(victim, victim.stat().st_size - 7)
  with CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(CheckpointCorruptError, match=str(victim)):
      ckpt.restore(like=(t1, opt.init(t1)))
    _assert_same_tree(ckpt.restore(1, like=(t2, opt.init(t2))).trainable, t1)


_KILLED_SAVE = """
import sys
import jax.numpy as jnp, numpy as np
from jlora.checkpoint import CheckpointManager
ckpt = CheckpointManager(sys.argv[1], async_save=True)
ckpt.save(1, trainable={"w": jnp.arange(8.0)}, opt_state={}, extra="one")
ckpt.wait_until_finished()
big = np.random.default_rng(0).random(32_000_000, dtype=np.float32)
ckpt.save(2, trainable={"w": jnp.asarray(big[:8])}, opt_state={"big": big},
          extra="two")
print("WRITING", flush=True)  # the background write has just started
ckpt.wait_until_finished()
print("DONE", flush=True)
"""


def test_killed_save_is_skipped_and_previous_step_restores(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_KILLED_SAVE)
  run = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  child = subprocess.Popen([sys.executable, str(script), str(run)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True)
  try:
    for line in child.stdout:
      if line.startswith("WRITING"):
        os.kill(child.pid, signal.SIGKILL)
        break
  finally:
    child.kill()
    child.wait()
  assert child.returncode == -signal.SIGKILL
  leftovers = [p.name for p in run.iterdir() if p.name.startswith("2")]
  assert leftovers and all("tmp" in name for name in leftovers), leftovers

  like = ({"w": jnp.zeros(8)}, {})
  with CheckpointManager(run) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    restored = ckpt.restore(like=like)
    assert restored.step == 1 and restored.extra == "one"
    np.testing.assert_array_equal(restored.trainable["w"], np.arange(8.0))
    # Training goes on: step 2 can be saved again.
    ckpt.save(2, trainable={"w": jnp.ones(8)}, opt_state={}, extra="again")
  with CheckpointManager(run) as ckpt:
    assert ckpt.restore(like=like).extra == "again"


# ------------------------------------------------------------------ training


def _training():
  model = MLP()
  params = _params()
  tx = optax.adam(1e-2)
  forward = jlora.wrap(model.apply)

  def init(key):
    trainable, frozen = jlora.partition(
        jlora.apply(params, rank=4, alpha=8.0, key=key))
    return trainable, frozen, tx.init(trainable)

  @jax.jit
  def step(trainable, frozen, opt_state, rng):
    rng, kx = jax.random.split(rng)
    x = jax.random.normal(kx, (16, 8))
    y = jnp.sin(x[:, :4])

    def loss_fn(t):
      out = forward({"params": jlora.combine(t, frozen)}, x)
      return jnp.mean((out - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, rng, loss

  return init, step


@pytest.mark.parametrize("async_save", [True, False])
def test_resume_is_bit_identical(tmp_path, async_save):
  k = 4
  init, step = _training()
  trainable, frozen, opt_state = init(jax.random.key(1))
  rng = jax.random.key(42)
  ref_losses = []
  t, o, r = trainable, opt_state, rng
  for _ in range(2 * k):
    t, o, r, loss = step(t, frozen, o, r)
    ref_losses.append(np.asarray(loss))

  losses = []
  t, o, r = trainable, opt_state, rng
  with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
    for i in range(k):
      t, o, r, loss = step(t, frozen, o, r)
      losses.append(np.asarray(loss))
      ckpt.save(i + 1, trainable=t, opt_state=o, rng=r, extra={"seen": i + 1})
  del t, o, r

  # A fresh process would rebuild `like` from scratch: other init key.
  like_t, frozen2, like_o = init(jax.random.key(7))
  with CheckpointManager(tmp_path) as ckpt:
    assert ckpt.latest_step() == k and ckpt.all_steps() == [k - 2, k - 1, k]
    restored = ckpt.restore(like=(like_t, like_o))
  assert restored.step == k and restored.extra == {"seen": k}
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert jax.tree.structure(restored.trainable) == jax.tree.structure(like_t)
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(like_o)
  t, o, r = restored.trainable, restored.opt_state, restored.rng
  for _ in range(k):
    t, o, r, loss = step(t, frozen2, o, r)
    losses.append(np.asarray(loss))
  np.testing.assert_array_equal(np.stack(losses), np.stack(ref_losses))


def test_manager_steps_interval_and_raw_keys(tmp_path):
  trainable, _ = jlora.partition(_lora(_params()))
  opt_state = optax.sgd(0.1, momentum=0.9).init(trainable)
  with CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2,
                         async_save=False) as ckpt:
    assert ckpt.save(0, trainable=trainable, opt_state=opt_state)
    assert not ckpt.save(3, trainable=trainable, opt_state=opt_state)
    assert ckpt.save(3, trainable=trainable, opt_state=opt_state, force=True)
    assert ckpt.save(4, trainable=trainable, opt_state=opt_state,
                     rng=jax.random.PRNGKey(3))
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    r = ckpt.restore(like=(trainable, opt_state))
    np.testing.assert_array_equal(r.rng, np.asarray(jax.random.PRNGKey(3)))
    assert r.rng.dtype == jnp.uint32
    assert ckpt.restore(3, like=(trainable, opt_state)).rng is None
    _assert_same_tree(r.opt_state, opt_state)


# ------------------------------------------------------------------ sharding


def _sharded_check(directory):
  """Adapters restored into the shardings derived from a sharded base."""
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((2, 4), ("data", "model"))

  def put(tree, specs):
    return jax.tree.map(
        lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
        tree, specs)

  host = {"dense": {"kernel": np.arange(16 * 32, dtype=np.float32).reshape(
      16, 32) / 100, "bias": np.zeros(32, np.float32)},
          "stack": {"kernel": np.ones((4, 16, 32), np.float32)}}
  specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")},
           "stack": {"kernel": P(None, "data", "model")}}
  params = put(host, specs)
  lp = jlora.apply(params, rank=4, key=KEY, targets="kernel")
  lp = jax.tree.map(lambda n: dataclasses.replace(n, b=n.b + 0.25)
                    if is_lora(n) else n, lp, is_leaf=is_lora)
  save_adapter(os.path.join(directory, "adapter"), lp)

  got = load_adapter(os.path.join(directory, "adapter"), params)
  _assert_same_tree(got, lp)
  expect = {("dense", "a"): P("data", None), ("dense", "b"): P(None, "model"),
            ("stack", "a"): P(None, "data", None),
            ("stack", "b"): P(None, None, "model")}
  for (layer, field), spec in expect.items():
    arr = getattr(got[layer]["kernel"], field)
    want = jax.sharding.NamedSharding(mesh, spec)
    assert arr.sharding.is_equivalent_to(want, arr.ndim), (layer, field,
                                                           arr.sharding)

  # Onto a base sharded differently, the adapters follow the new base.
  flipped = put(host, {"dense": {"kernel": P("model", "data"),
                                 "bias": P("data")},
                       "stack": {"kernel": P("data", None, "model")}})
  got = load_adapter(os.path.join(directory, "adapter"), flipped)
  a = got["dense"]["kernel"].a
  assert a.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P("model", None)), 2)
  assert got["stack"]["kernel"].b.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P("data", None, "model")), 3)
  np.testing.assert_array_equal(np.asarray(a),
                                np.asarray(lp["dense"]["kernel"].a))
  replicated = jax.sharding.NamedSharding(mesh, P())
  got = load_adapter(os.path.join(directory, "adapter"), params,
                     shardings=replicated)
  assert got["stack"]["kernel"].a.sharding.is_equivalent_to(replicated, 3)
  got = load_adapter(os.path.join(directory, "adapter"), params,
                     shardings=lambda path, field, kernel: replicated
                     if field == "b" else None)
  assert got["dense"]["kernel"].b.sharding.is_equivalent_to(replicated, 2)
  _assert_same_tree(got, lp)

  # Training state restores into the shardings of `like`.
  trainable, _ = jlora.partition(lp)
  opt_state = optax.adam(1e-3).init(trainable)
  with CheckpointManager(os.path.join(directory, "run")) as ckpt:
    ckpt.save(1, trainable=trainable, opt_state=opt_state)
    r = ckpt.restore(like=(trainable, opt_state))
  for g, w in zip(jax.tree.leaves((r.trainable, r.opt_state)),
                  jax.tree.leaves((trainable, opt_state))):
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

  save_merged(os.path.join(directory, "merged"), lp)
  merged = load_merged(os.path.join(directory, "merged"), like=params)
  assert merged["dense"]["kernel"].sharding == params["dense"][
      "kernel"].sharding
  np.testing.assert_array_equal(np.asarray(merged["dense"]["kernel"]),
                                np.asarray(lp["dense"]["kernel"].materialize()))


def test_sharded_restore_on_8_devices(tmp_path):
  if jax.device_count() >= 8:
    _sharded_check(str(tmp_path))
    return
  # JAX already started with fewer devices: run in a fresh process.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
  code = textwrap.dedent(f"""
      import test_checkpoint
      test_checkpoint._sharded_check({str(tmp_path)!r})
      print("SHARDED OK")
  """)
  out = subprocess.run([sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=120)
  assert "SHARDED OK" in out.stdout, out.stderr[-3000:]
