"""The LoRA node: delta/materialize against float64 NumPy, merge, counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora
from helpers import np_fused, np_merge, randomize_b, rel_err

KEY = jax.random.key(0)


@settings(max_examples=20, deadline=None)
@given(layout=st.sampled_from(["io", "bio", "ioo", "iio", "bbio", "oi", "bioo"]),
       rank=st.integers(1, 3), rslora=st.booleans(),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_materialize_matches_reference(layout, rank, rslora, dtype):
  shape = tuple(3 + k for k in range(len(layout)))
  w = jax.random.normal(KEY, shape, dtype)
  lp = jlora.apply({"k": w}, rank=rank, alpha=2.0, targets="k", key=KEY,
                   layout={"k": layout}, rslora=rslora)
  lp = randomize_b(lp, jax.random.key(3))
  fused = jlora.merge(lp)["k"]
  assert fused.dtype == dtype and fused.shape == shape
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert rel_err(fused, np_fused(lp["k"])) < tol


def test_scale_and_rank():
  node = jlora.apply({"k": jnp.ones((8, 8))}, rank=4, alpha=8.0, targets="k",
                     key=KEY)["k"]
  assert (node.rank, node.scale) == (4, 2.0)
  rs = dataclasses.replace(node, rslora=True)
  assert rs.scale == pytest.approx(8.0 / 2.0)


def test_gains_e_and_dora_magnitude_in_merge():
  lp = randomize_b(jlora.apply({"k": jax.random.normal(KEY, (6, 5))}, rank=3,
                               targets="k", key=KEY), KEY)
  node = dataclasses.replace(lp["k"], e=jnp.array([1.0, 0.0, 2.0]),
                             m=jnp.linspace(0.5, 2.0, 5))
  fused = jlora.merge({"k": node})["k"]
  assert rel_err(fused, np_fused(node)) < 1e-6
  # DoRA: every output column's norm equals its magnitude.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(fused), axis=0),
                             node.m, rtol=1e-5)


def test_merge_under_jit_and_of_half_raises():
  lp = randomize_b(jlora.apply({"k": jnp.ones((4, 4))}, rank=2, targets="k",
                               key=KEY), KEY)
  np.testing.assert_allclose(jax.jit(jlora.merge)(lp)["k"],
                             np_merge(lp)["k"], rtol=1e-6)
  trainable, _ = jlora.partition(lp)
  with pytest.raises(ValueError, match="combine"):
    jlora.merge(trainable)


def test_count_and_summary():
  params = {"a": {"kernel": jnp.ones((16, 8))}, "b": {"kernel": jnp.ones((3, 8, 4))},
            "norm": {"scale": jnp.ones(8)}}
  lp = jlora.apply(params, rank=2, key=KEY)
  c = jlora.count(lp)
  expected_train = 2 * (16 + 8) + 3 * 2 * (8 + 4)
  assert c.trainable == expected_train
  assert c.total == expected_train + 16 * 8 + 3 * 8 * 4 + 8
  text = jlora.summary(lp)
  assert "b/kernel" in text and "(3, 8, 4)" in text and "bio" in text
  assert f"{expected_train:,}" in text
