"""`jlora.apply`: node shapes, init, layouts, rank checks, tree kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given, settings, strategies as st

import jlora
from jlora.node import is_lora

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
