"""`jlora.apply`: node shapes, init, layouts, rank checks, tree kinds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given, settings, strategies as st

import jlora
from jlora.node import is_lora
from helpers import np_fused

KEY = jax.random.key(0)


def _params():
  return {"attn": {"q_proj": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)},
                   "v_proj": {"kernel": jnp.ones((16, 4))}},
          "lm_head": {"kernel": jnp.ones((8, 32))}}


def test_nodes_shapes_scale_and_init():
  params = _params()
  lp = jlora.apply(params, rank=4, alpha=16.0, key=KEY)
  node = lp["attn"]["q_proj"]["kernel"]
  assert isinstance(node, jlora.LoRA)
  assert node.a.shape == (16, 4) and node.b.shape == (4, 8)
  assert node.rank == 4 and node.scale == 4.0
  assert node.path == "attn/q_proj/kernel"
  # PEFT's kaiming-uniform bound for lora_A: 1/sqrt(in).
  assert float(jnp.abs(node.a).max()) <= 1 / np.sqrt(16)
  # U(-c, c) has std c / sqrt(3) = 0.144 here; 64 draws land near it.
  assert 0.10 < float(node.a.std()) < 0.19
  np.testing.assert_array_equal(node.b, 0)
  # The base kernel is held as is, never copied.
  assert node.w is params["attn"]["q_proj"]["kernel"]
  # Untargeted leaves are the very same objects; the head is left alone.
  assert lp["lm_head"]["kernel"] is params["lm_head"]["kernel"]
  assert not is_lora(lp["attn"]["q_proj"]["bias"])


def test_default_alpha_gives_unit_scale_and_rslora():
  lp = jlora.apply(_params(), rank=4, key=KEY)
  assert lp["attn"]["v_proj"]["kernel"].scale == 1.0
  lp = jlora.apply(_params(), rank=4, alpha=8.0, rslora=True, key=KEY)
  assert lp["attn"]["v_proj"]["kernel"].scale == pytest.approx(8.0 / 2.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_of_fresh_adapter_is_bit_identical(dtype):
  params = jax.tree.map(
      lambda x: jax.random.normal(KEY, x.shape, dtype), _params())
  merged = jlora.merge(jlora.apply(params, rank=4, key=KEY))
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32),
                                  np.asarray(y, np.float32))


def test_adapter_dtype_default_and_override():
  params = {"k": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
  assert jlora.apply(params, rank=2, key=KEY)["k"]["kernel"].a.dtype == jnp.float32
  node = jlora.apply(params, rank=2, key=KEY, dtype=jnp.bfloat16)["k"]["kernel"]
  assert node.a.dtype == node.b.dtype == jnp.bfloat16


def test_stacked_kernel_gets_one_adapter_per_layer():
  params = {"layers": {"kernel": jnp.ones((3, 16, 8))}}
  node = jlora.apply(params, rank=2, key=KEY)["layers"]["kernel"]
  assert node.layout == "bio"
  assert node.a.shape == (3, 16, 2) and node.b.shape == (3, 2, 8)
  # Layers draw different random A.
  assert not np.allclose(node.a[0], node.a[1])


def test_layout_for_multi_axis_kernels():
  params = {"qkv": {"kernel": jnp.ones((16, 4, 8))},
            "o": {"kernel": jnp.ones((4, 8, 16))}}
  lp = jlora.apply(params, rank=2, key=KEY,
                   layout={"qkv": "ioo", "o/": "iio"})
  assert lp["qkv"]["kernel"].a.shape == (16, 2)
  assert lp["qkv"]["kernel"].b.shape == (2, 32)
  assert lp["o"]["kernel"].a.shape == (32, 2)
  assert lp["o"]["kernel"].b.shape == (2, 16)


@pytest.mark.parametrize("layout,match", [
    ("io", "2 letters"), ("ixo", "only use the letters"), ("iii", "output")])
def test_bad_layout(layout, match):
  with pytest.raises(ValueError, match=match):
    jlora.apply({"qkv": {"kernel": jnp.ones((16, 4, 8))}}, rank=2, key=KEY,
                layout={"qkv": layout})


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "4"])
def test_rank_must_be_positive_int(rank):
  with pytest.raises(ValueError, match="positive int"):
    jlora.apply(_params(), rank=rank, key=KEY)


def test_rank_above_min_dimension_names_path_and_fix():
  with pytest.raises(ValueError, match=r"rank 5 exceeds min\(in, out\) = 4 for "
                     r"'attn/v_proj/kernel'.*exclude it"):
    jlora.apply(_params(), rank=5, key=KEY)


def test_rank_and_alpha_patterns():
  lp = jlora.apply(_params(), rank=4, alpha=8.0, key=KEY,
                   rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1.0})
  assert lp["attn"]["q_proj"]["kernel"].rank == 4
  assert lp["attn"]["v_proj"]["kernel"].rank == 2
  assert lp["attn"]["v_proj"]["kernel"].scale == 0.5


def test_missing_key_and_double_apply():
  with pytest.raises(ValueError, match="PRNG key"):
    jlora.apply(_params(), rank=2)
  lp = jlora.apply(_params(), rank=2, key=KEY)
  with pytest.raises(ValueError, match="already hold LoRA"):
    jlora.apply(lp, rank=2, key=KEY)


def test_no_target_matched():
  with pytest.raises(ValueError, match="matched no kernel"):
    jlora.apply(_params(), rank=2, key=KEY, targets="k_proj")


def test_frozen_dict_and_nnx_state():
  lp = jlora.apply(FrozenDict(_params()), rank=2, key=KEY)
  assert isinstance(lp, FrozenDict)
  assert is_lora(lp["attn"]["q_proj"]["kernel"])

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.q_proj = nnx.Linear(8, 8, rngs=rngs)
      self.out = nnx.Linear(8, 2, rngs=rngs)
  _, state = nnx.split(Net(nnx.Rngs(0)))
  lp = jlora.apply(state, rank=2, key=KEY, targets="q_proj")
  assert isinstance(lp, nnx.State)
  paths = [n.path for n in jax.tree.leaves(lp, is_leaf=is_lora) if is_lora(n)]
  assert paths == ["q_proj/kernel"]


def test_apply_under_jit_matches_eager():
  params = _params()
  eager = jlora.apply(params, rank=2, key=KEY)
  jitted = jax.jit(lambda p, k: jlora.apply(p, rank=2, key=k))(params, KEY)
  np.testing.assert_array_equal(jitted["attn"]["q_proj"]["kernel"].a,
                                eager["attn"]["q_proj"]["kernel"].a)


@settings(max_examples=15, deadline=None)
@given(fan_in=st.integers(1, 12), fan_out=st.integers(1, 12),
       layers=st.integers(0, 3), data=st.data())
def test_shapes_property(fan_in, fan_out, layers, data):
  rank = data.draw(st.integers(1, min(fan_in, fan_out)))
  shape = ((layers,) if layers else ()) + (fan_in, fan_out)
  node = jlora.apply({"kernel": jnp.ones(shape)}, rank=rank,
                     key=KEY)["kernel"]
  stacked = shape[:-2]
  assert node.a.shape == (*stacked, fan_in, rank)
  assert node.b.shape == (*stacked, rank, fan_out)


def test_dora_magnitude_is_column_norm_and_merge_is_identity():
  w = jax.random.normal(KEY, (3, 16, 8))
  node = jlora.apply({"kernel": w}, rank=2, key=KEY, dora=True)["kernel"]
  np.testing.assert_allclose(node.m, np.linalg.norm(np.asarray(w), axis=1),
                             rtol=1e-6)
  np.testing.assert_allclose(jlora.merge({"kernel": node})["kernel"], w,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_init_methods_preserve_the_base_function(init):
  w = jax.random.normal(KEY, (16, 8))
  lp = jlora.apply({"kernel": w}, rank=4, key=KEY, init=init)
  node = lp["kernel"]
  np.testing.assert_allclose(jlora.merge(lp)["kernel"], w, rtol=1e-4,
                             atol=1e-5)
  if init != "gaussian":
    assert float(jnp.abs(node.b).max()) > 0  # principal part moved into b
  with pytest.raises(ValueError):
    jlora.apply({"kernel": w}, rank=4, key=KEY, init="nope")


def test_dropout_and_train_a_are_recorded():
  node = jlora.apply({"kernel": jnp.ones((4, 4))}, rank=2, key=KEY,
                     dropout=0.1, train_a=False)["kernel"]
  assert node.dropout == 0.1 and node.train_a is False
  with pytest.raises(ValueError, match="dropout"):
    jlora.apply({"kernel": jnp.ones((4, 4))}, rank=2, key=KEY, dropout=1.0)


# -- issue 21: integer kernels, argument validation, adversarial trees -------

def _mixed_dtype_params():
  return {"dense": {"kernel": jax.random.normal(KEY, (6, 4))},
          "ids": {"kernel": jnp.arange(24, dtype=jnp.int32).reshape(6, 4)},
          "flags": {"kernel": jnp.ones((6, 4), bool)}}


def test_integer_and_bool_kernels_are_never_adapted():
  params = _mixed_dtype_params()
  # "all-linear" looks at float kernels only.
  lp = jlora.apply(params, rank=2, key=KEY)
  assert is_lora(lp["dense"]["kernel"])
  assert lp["ids"]["kernel"] is params["ids"]["kernel"]
  assert lp["flags"]["kernel"] is params["flags"]["kernel"]
  # An explicit target that picks one, alone or among float kernels, errors
  # naming it and its dtype.
  with pytest.raises(ValueError, match=r"not floating point.*'ids/kernel': "
                     r"'int32'.*exclude="):
    jlora.apply(params, rank=2, key=KEY, targets="ids")
  with pytest.raises(ValueError, match=r"'flags/kernel': 'bool'"):
    jlora.apply(params, rank=2, key=KEY, targets=["dense", "flags"])
  with pytest.raises(ValueError, match="not floating point"):
    jlora.apply(params, rank=2, key=KEY, targets=lambda p, x: x.ndim == 2)
  # Excluding them is the fix the message names.
  lp = jlora.apply(params, rank=2, key=KEY, targets="kernel",
                   exclude="ids|flags")
  assert [n.path for n in jax.tree.leaves(lp, is_leaf=is_lora)
          if is_lora(n)] == ["dense/kernel"]


@pytest.mark.parametrize("field,dtype", [("w", jnp.int32), ("a", jnp.int8),
                                         ("b", jnp.int32), ("w", bool)])
def test_hand_built_integer_node_fails_at_merge_and_wrap(field, dtype):
  node = jlora.apply({"k": jax.random.normal(KEY, (4, 3))}, rank=2,
                     targets="k", key=KEY)["k"]
  node = dataclasses.replace(node, **{field: getattr(node, field).astype(
      dtype)})
  with pytest.raises(ValueError, match=rf"'k' has {field} of dtype.*floating"):
    jlora.merge({"k": node})
  with pytest.raises(ValueError, match=rf"'k' has {field} of dtype.*floating"):
    jlora.wrap(lambda p, x: x @ p["k"])({"k": node}, jnp.ones((2, 4)))


def test_node_with_foreign_factor_shapes_fails_at_merge_wrap_and_combine():
  node = jlora.apply({"k": jax.random.normal(KEY, (4, 3))}, rank=2,
                     targets="k", key=KEY)["k"]
  other = jlora.apply({"k": jax.random.normal(KEY, (5, 3))}, rank=2,
                      targets="k", key=KEY)["k"]
  bad = dataclasses.replace(node, a=other.a)
  with pytest.raises(ValueError, match=r"'k' has a of shape \(5, 2\).*needs "
                     r"\(4, 2\)"):
    jlora.merge({"k": bad})
  with pytest.raises(ValueError, match=r"'k' has a of shape \(5, 2\)"):
    jlora.wrap(lambda p, x: x @ p["k"])({"k": bad}, jnp.ones((2, 4)))
  trainable, _ = jlora.partition({"k": other})
  _, frozen = jlora.partition({"k": node})
  with pytest.raises(ValueError, match=r"'k' has a of shape"):
    jlora.combine(trainable, frozen)


def test_model_casting_kernel_to_integer_input_dtype():
  """wrap fuses before an integer cast, exactly as merge-then-run does."""
  w = jax.random.normal(KEY, (4, 3)) * 3
  lp = jlora.apply({"w": w}, rank=2, targets="w", key=KEY)
  lp = {"w": dataclasses.replace(lp["w"], b=2.0 * jnp.ones((2, 3)))}
  x = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
  fn = lambda p, x: x @ p["w"].astype(x.dtype)
  fused = np_fused(lp["w"])
  want = np.asarray(x) @ np.trunc(fused).astype(np.int64)
  got = jlora.wrap(fn)(lp, x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(fn(jlora.merge(lp), x)), want)
  # A product of an int input with the float kernel keeps the adapter.
  f2 = lambda p, x: jax.lax.dot_general(
      x, p["w"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  np.testing.assert_allclose(np.asarray(jlora.wrap(f2)(lp, x)),
                             np.asarray(x, np.float64) @ fused, rtol=1e-5)


@pytest.mark.parametrize("key", [0, 1.5, "seed", np.uint32(3),
                                 jnp.zeros((3,), jnp.uint32),
                                 jnp.zeros((2, 2), jnp.uint32),
                                 jnp.zeros((2,), jnp.float32)])
def test_bad_keys_name_the_accepted_forms(key):
  with pytest.raises((TypeError, ValueError),
                     match=r"key must be one PRNG key: jax\.random\.key\(seed\)"
                     r".*PRNGKey"):
    jlora.apply(_params(), rank=2, key=key)


def test_key_batch_and_legacy_key():
  with pytest.raises(ValueError, match=r"\(2,\) keys.*single key"):
    jlora.apply(_params(), rank=2, key=jax.random.split(KEY, 2))
  legacy = jlora.apply(_params(), rank=2, key=jax.random.PRNGKey(0))
  typed = jlora.apply(_params(), rank=2, key=jax.random.wrap_key_data(
      jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(legacy["attn"]["q_proj"]["kernel"].a,
                                typed["attn"]["q_proj"]["kernel"].a)


def test_numpy_integer_ranks_are_accepted():
  lp = jlora.apply(_params(), rank=np.int64(2), key=KEY,
                   rank_pattern={"q_proj": np.int32(3)})
  assert lp["attn"]["q_proj"]["kernel"].rank == 3
  assert lp["attn"]["v_proj"]["kernel"].rank == 2
  assert type(lp["attn"]["v_proj"]["kernel"].alpha) is float
  assert lp["attn"]["v_proj"]["kernel"].scale == 1.0


@pytest.mark.parametrize("rank", [np.bool_(True), np.float64(2.0), np.int64(0),
                                  -3, 2.5])
def test_bad_numpy_ranks_name_the_path(rank):
  with pytest.raises(ValueError, match=r"positive int.*attn/q_proj/kernel"):
    jlora.apply(_params(), rank=rank, key=KEY)
  with pytest.raises(ValueError, match=r"positive int.*'attn/v_proj/kernel'"):
    jlora.apply(_params(), rank=2, key=KEY, rank_pattern={"v_proj": rank})


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "2", True,
                                   [2.0], jnp.ones(2)])
def test_alpha_must_be_a_finite_number(alpha):
  with pytest.raises(ValueError, match=r"alpha must be a finite number.*"
                     r"attn/q_proj/kernel"):
    jlora.apply(_params(), rank=2, alpha=alpha, key=KEY)


def test_alpha_zero_rejected_negative_alpha_flips_the_update():
  with pytest.raises(ValueError, match=r"alpha=0.*zero gradients"):
    jlora.apply(_params(), rank=2, alpha=0.0, key=KEY)
  with pytest.raises(ValueError, match=r"alpha=0 for 'attn/v_proj/kernel'"):
    jlora.apply(_params(), rank=2, key=KEY, alpha_pattern={"v_proj": 0})
  w = jax.random.normal(KEY, (6, 4))
  lp = jlora.apply({"k": w}, rank=2, alpha=-3.0, key=KEY, targets="k",
                   alpha_pattern={"k": np.float32(-3.0)})
  node = dataclasses.replace(lp["k"], b=jnp.ones((2, 4)))
  assert node.scale == -1.5
  want = np.asarray(w, np.float64) - 1.5 * (
      np.asarray(node.a, np.float64) @ np.ones((2, 4)))
  np.testing.assert_allclose(jlora.merge({"k": node})["k"], want, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout="0.1"), ValueError, "dropout must be a number"),
    (dict(dropout=True), ValueError, "dropout must be a number"),
    (dict(dropout=-0.1), ValueError, r"dropout must be a number in \[0, 1\)"),
    (dict(dtype=jnp.int32), ValueError, "dtype.*floating point"),
    (dict(dtype=bool), ValueError, "dtype.*floating point"),
    (dict(rslora="false"), TypeError, "rslora must be True or False"),
    (dict(dora=1), TypeError, "dora must be True or False"),
    (dict(train_a=None), TypeError, "train_a must be True or False"),
    (dict(init=None), TypeError, "init must be a string"),
    (dict(layout="io"), TypeError, "layout must be a dict"),
    (dict(layout={"q_proj": ["i", "o"]}), TypeError, r"layout\['q_proj'\]"),
    (dict(rank_pattern=[("q", 2)]), TypeError, "rank_pattern must be a dict"),
    (dict(rank_pattern={"q_prj": 2}), ValueError,
     "rank_pattern key 'q_prj' matches none"),
    (dict(alpha_pattern={"nope": 2.0}), ValueError,
     "alpha_pattern key 'nope' matches none"),
    (dict(targets=3), TypeError, "a selector must be"),
    (dict(targets=[]), ValueError, r"targets=\[\] selects nothing"),
    (dict(targets="(q_proj"), ValueError, "not a valid regex"),
    (dict(exclude=1.5), TypeError, "a selector must be"),
    (dict(exclude="kernel"), ValueError, "removes every kernel"),
    (dict(exclude="lm_haed"), ValueError,
     r"exclude 'lm_haed' matches no parameter.*lm_head/kernel"),
])
def test_option_errors_name_the_option(kwargs, error, match):
  with pytest.raises(error, match=match):
    jlora.apply(_params(), rank=2, key=KEY, **kwargs)


def test_numpy_scalars_for_options_become_python_values():
  node = jlora.apply(_params(), rank=2, key=KEY, dropout=np.float32(0.25),
                     rslora=np.bool_(True))["attn"]["v_proj"]["kernel"]
  assert type(node.dropout) is float and node.dropout == 0.25
  assert node.rslora is True


def test_empty_and_unusual_trees():
  with pytest.raises(ValueError, match="empty tree"):
    jlora.apply({}, rank=2, key=KEY)
  # None leaves, scalar leaves and Python numbers pass through untouched.
  params = {"dense": {"kernel": jnp.ones((4, 3))}, "none": None,
            "step": jnp.int32(3), "temperature": 0.5}
  lp = jlora.apply(params, rank=2, key=KEY)
  assert lp["none"] is None and lp["temperature"] == 0.5
  back = jlora.combine(*jlora.partition(lp))
  merged = jlora.merge(back)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_array_equal(merged["dense"]["kernel"], 1.0)
  out = jlora.wrap(lambda p, x: p["temperature"] * (x @ p["dense"]["kernel"])
                   + p["step"])(lp, jnp.ones((2, 4)))
  np.testing.assert_allclose(out, 0.5 * 4.0 + 3.0)


def test_duplicate_targets_adapt_once():
  lp = jlora.apply(_params(), rank=2, key=KEY, targets=["q_proj", "q_proj",
                                                        r"q_proj/kernel"])
  nodes = [n for n in jax.tree.leaves(lp, is_leaf=is_lora) if is_lora(n)]
  assert [n.path for n in nodes] == ["attn/q_proj/kernel"]


def test_vmap_over_keys_matches_one_key_at_a_time():
  keys = jax.random.split(KEY, 3)
  many = jax.vmap(lambda k: jlora.apply(_params(), rank=2, key=k))(keys)
  for i in range(3):
    one = jlora.apply(_params(), rank=2, key=keys[i])
    np.testing.assert_array_equal(many["attn"]["q_proj"]["kernel"].a[i],
                                  one["attn"]["q_proj"]["kernel"].a)
