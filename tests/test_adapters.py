"""`jlora.adapters`: named adapters on one base, switching, save/load.

References: float64 NumPy forwards (`helpers.np_merge`) and the trees that
went in (bit-exact, identity of the base arrays).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.adapters import (AdapterSet, add_adapter, load_adapter_set,
                            remove_adapter, save_adapter_set, select,
                            set_active, wrap)
from helpers import np_merge, randomize_b, rel_err

KEY = jax.random.key(0)
X = np.asarray(jax.random.normal(jax.random.key(1), (3, 8)), np.float32)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="up")(x))
    return nn.Dense(4, name="down")(h)


PARAMS = MLP().init(KEY, X)["params"]


def np_forward(p, x):
  h = np.maximum(x @ p["up"]["kernel"] + p["up"]["bias"], 0)
  return h @ p["down"]["kernel"] + p["down"]["bias"]


def _lora(seed, rank=4, **kw):
  lp = jlora.apply(PARAMS, rank=rank, key=jax.random.key(seed), **kw)
  return randomize_b(lp, jax.random.key(seed + 100))


def _assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.dtype(g.dtype) == np.dtype(w.dtype)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.fixture(scope="module")
def two():
  lp_a, lp_b = _lora(1), _lora(2)
  return lp_a, lp_b, add_adapter(lp_a, "b", lp_b, base_name="a")


def test_select_returns_each_adapter_exactly(two):
  lp_a, lp_b, s = two
  assert s.names == ("a", "b") and s.active == "a"
  _assert_same_tree(select(s, "a"), lp_a)
  _assert_same_tree(select(s, "b"), lp_b)
  _assert_same_tree(select(s), lp_a)  # the active one
  # The bare base is the original params, no merge needed.
  _assert_same_tree(select(s, None), PARAMS)


def test_switching_shares_the_base_arrays(two):
  _, _, s = two
  base_up = s.base["up"]["kernel"]
  for name in ("a", "b"):
    node = select(s, name)["up"]["kernel"]
    assert node.w is base_up
  assert select(s, None)["up"]["kernel"] is base_up
  # Adding an adapter does not copy the base either.
  s2 = add_adapter(s, "c", _lora(3))
  assert s2.base["up"]["kernel"] is base_up


def test_switch_does_not_retrace_a_jitted_step(two):
  lp_a, lp_b, s = two
  traces = []
  forward = jlora.wrap(MLP().apply)

  @jax.jit
  def step(params, x):
    traces.append(1)  # runs once per trace
    return forward({"params": params}, x)

  for name, lp in (("a", lp_a), ("b", lp_b), ("a", lp_a), (None, None)):
    y = step(select(s, name), X)
    ref = np_forward(np_merge(lp) if lp else np_merge(PARAMS), X)
    assert rel_err(y, ref) < 1e-5, name
  # a, b, a: one trace; the bare base (plain params) is another structure.
  assert len(traces) == 2
  # An adapter of another rank is another structure: it retraces once.
  s8 = add_adapter(s, "r2", _lora(4, rank=2))
  step(select(s8, "r2"), X)
  step(select(s8, "r2"), X)
  assert len(traces) == 3


def test_set_is_a_pytree_under_jit(two):
  lp_a, lp_b, s = two
  pick = jax.jit(lambda s: select(s, "b"))
  _assert_same_tree(pick(s), lp_b)
  n_arrays = len(jax.tree.leaves(s))
  # base: 4 arrays; each adapter: a and b of 2 targets.
  assert n_arrays == 4 + 2 * 4


@pytest.mark.parametrize("jit", [False, True])
def test_wrap_adapter_selects_then_wraps(two, jit):
  lp_a, lp_b, s = two
  fns = {name: wrap(MLP().apply, adapter=name) for name in ("a", "b", None)}
  fns["active"] = wrap(MLP().apply)
  if jit:
    fns = {k: jax.jit(f) for k, f in fns.items()}
  refs = {"a": np_forward(np_merge(lp_a), X),
          "b": np_forward(np_merge(lp_b), X),
          None: np_forward(np_merge(PARAMS), X),
          "active": np_forward(np_merge(lp_a), X)}
  for k, f in fns.items():
    assert rel_err(f({"params": s}, X), refs[k]) < 1e-5, k


def test_trainable_half_and_lora_fa(two):
  lp_a, lp_b, s = two
  trainable, _ = jlora.partition(lp_b)
  s2 = add_adapter(PARAMS, "b", trainable)
  assert s2.active is None
  _assert_same_tree(select(s2, "b"), lp_b)
  # LoRA-FA: `a` is frozen, so the trainable half lacks it; the complete
  # tree keeps it.
  fa = _lora(5, train_a=False)
  with pytest.raises(ValueError, match="LoRA-FA"):
    add_adapter(s, "fa", jlora.partition(fa)[0])
  _assert_same_tree(select(add_adapter(s, "fa", fa), "fa"), fa)


def test_dora_and_stacked_adapters_round_trip():
  dora = _lora(6, dora=True)
  s = add_adapter(PARAMS, "dora", dora, activate=True)
  assert s.active == "dora"
  _assert_same_tree(select(s), dora)
  stacked = {"layers": {"kernel": jnp.ones((3, 8, 5))}}
  lp = randomize_b(jlora.apply(stacked, rank=2, key=KEY), KEY)
  s = add_adapter(lp, "two", randomize_b(lp, jax.random.key(9)))
  _assert_same_tree(select(s, "default"), lp)


def test_set_active_and_remove(two):
  _, lp_b, s = two
  s = set_active(s, "b")
  _assert_same_tree(select(s), lp_b)
  assert set_active(s, None).active is None
  s = remove_adapter(s, "b")
  assert s.names == ("a",) and s.active is None
  with pytest.raises(KeyError, match=r"no adapter 'b'.*\['a'\]"):
    select(s, "b")


def test_errors_name_the_problem(two):
  _, lp_b, s = two
  with pytest.raises(ValueError, match="already in the set"):
    add_adapter(s, "a", lp_b)
  with pytest.raises(ValueError, match="directory name"):
    add_adapter(s, "x/y", lp_b)
  with pytest.raises(KeyError, match="no adapter 'zzz'"):
    set_active(s, "zzz")
  # An adapter made on a different base (other shapes) is refused, by path.
  other = MLP().init(KEY, np.ones((1, 6), np.float32))["params"]
  alien = jlora.apply(other, rank=4, key=KEY)
  with pytest.raises(ValueError, match="'up/kernel'"):
    add_adapter(s, "alien", alien)
  with pytest.raises(ValueError, match="no LoRA nodes"):
    add_adapter(s, "plain", PARAMS)
  with pytest.raises(TypeError, match="AdapterSet"):
    select(PARAMS, "a")


# -------------------------------------------------------------- save/load


def test_save_load_round_trip_bit_exact(two, tmp_path):
  lp_a, lp_b, s = two
  s = set_active(s, "b")
  save_adapter_set(tmp_path / "set", s)
  loaded = load_adapter_set(tmp_path / "set", PARAMS)
  assert isinstance(loaded, AdapterSet)
  assert loaded.names == s.names and loaded.active == "b"
  _assert_same_tree(loaded, s)
  _assert_same_tree(select(loaded, "a"), lp_a)
  # Each adapter is an ordinary adapter checkpoint too.
  _assert_same_tree(jlora.load_adapter(tmp_path / "set" / "b", PARAMS), lp_b)
  # A subset.
  only_a = load_adapter_set(tmp_path / "set", PARAMS, names=["a"])
  assert only_a.names == ("a",) and only_a.active is None
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_adapter_set(tmp_path / "set", s)
  save_adapter_set(tmp_path / "set", remove_adapter(s, "a"), overwrite=True)
  assert load_adapter_set(tmp_path / "set", PARAMS).names == ("b",)
  assert not (tmp_path / "set" / "a").exists()  # no stale adapter left


def test_missing_adapter_directory_is_named(two, tmp_path):
  _, _, s = two
  save_adapter_set(tmp_path / "set", s)
  import shutil
  shutil.rmtree(tmp_path / "set" / "b")
  with pytest.raises(FileNotFoundError, match="adapter 'b'"):
    load_adapter_set(tmp_path / "set", PARAMS)
  assert load_adapter_set(tmp_path / "set", PARAMS, names=["a"]).names == (
      "a",)
  with pytest.raises(FileNotFoundError, match="no adapter set"):
    load_adapter_set(tmp_path / "nothing", PARAMS)
  with pytest.raises(KeyError, match=r"\['zzz'\]"):
    load_adapter_set(tmp_path / "set", PARAMS, names=["zzz"])


def test_peft_format_per_adapter(tmp_path):
  """Each adapter of a set written and read back in PEFT's format."""
  peft_io = pytest.importorskip("jlora.peft")
  if not (hasattr(peft_io, "save") and hasattr(peft_io, "load")):
    pytest.skip("jlora.peft.save/load not available")
  rng = np.random.default_rng(0)
  base = {"layers": {str(i): {"q_proj": {"kernel": jnp.asarray(
      rng.normal(size=(8, 8)), jnp.float32)}} for i in range(2)}}
  lps = {n: randomize_b(jlora.apply(base, rank=2, targets="q_proj",
                                    key=jax.random.key(k)), jax.random.key(k))
         for k, n in enumerate(("x", "y"))}
  s = add_adapter(base, "x", lps["x"])
  s = add_adapter(s, "y", lps["y"])
  for name in s.names:
    peft_io.save(select(s, name), tmp_path / name)
  back = add_adapter(base, "x", peft_io.load(tmp_path / "x", base))
  back = add_adapter(back, "y", peft_io.load(tmp_path / "y", base))
  for name in s.names:
    np.testing.assert_allclose(np.asarray(jlora.merge(select(back, name))[
        "layers"]["0"]["q_proj"]["kernel"]), np_merge(lps[name])["layers"][
            "0"]["q_proj"]["kernel"], rtol=1e-6, atol=1e-6)
