"""`jlora.lorahub.search` on a task whose answer is known by construction.

The target map is the base plus exactly ``delta_a + 0.5 delta_b`` (hand-built
from float64 NumPy), with a third, irrelevant adapter ``c``; the search must
find weights near (1, 0.5, 0) and beat uniform weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.adapters import add_adapter
from jlora.lorahub import search
from jlora.merging import combine_adapters
from jlora.node import LoRA

pytest.importorskip("evosax")

FAN_IN, FAN_OUT, RANK = 12, 6, 2


def _toy():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(FAN_IN, FAN_OUT)) / np.sqrt(FAN_IN)
  base = {"dense": {"kernel": jnp.asarray(kernel, jnp.float32)}}
  s, deltas = None, {}
  for name in ("a", "b", "c"):
    a = rng.normal(size=(FAN_IN, RANK)) / np.sqrt(FAN_IN)
    b = rng.normal(size=(RANK, FAN_OUT))
    node = LoRA(w=base["dense"]["kernel"], a=jnp.asarray(a, jnp.float32),
                b=jnp.asarray(b, jnp.float32), alpha=4.0, path="dense/kernel")
    deltas[name] = 2.0 * a @ b  # scale = alpha / r = 2
    s = add_adapter(base if s is None else s, name, {"dense": {"kernel": node}})
  x = rng.normal(size=(64, FAN_IN))
  y = x @ (kernel + deltas["a"] + 0.5 * deltas["b"])
  return s, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))


def loss_fn(lp, batch):
  x, y = batch
  pred = jlora.wrap(lambda p, x: x @ p["dense"]["kernel"])(lp, x)
  return jnp.mean((pred - y) ** 2)


@pytest.fixture(scope="module")
def toy():
  return _toy()


def test_search_recovers_the_linear_combination(toy):
  s, batch = toy
  weights, lp = search(s, ["a", "b", "c"], batch, loss_fn, steps=40,
                       key=jax.random.key(0), l1=1e-3)
  assert set(weights) == {"a", "b", "c"}
  np.testing.assert_allclose([weights["a"], weights["b"], weights["c"]],
                             [1.0, 0.5, 0.0], atol=0.05)
  uniform = combine_adapters(s, {n: 1 / 3 for n in "abc"}, "cat")
  assert float(loss_fn(lp, batch)) < 0.05 * float(loss_fn(uniform, batch))
  # The returned tree is the combination at the returned weights.
  again = combine_adapters(s, weights, "cat")
  np.testing.assert_array_equal(np.asarray(lp["dense"]["kernel"].delta()),
                                np.asarray(again["dense"]["kernel"].delta()))


@pytest.mark.fast_tier  # the module's one test in the fast tier
def test_search_is_deterministic_given_the_key(toy):
  s, batch = toy
  run = lambda k: search(s, ["a", "b"], batch, loss_fn, steps=15,
                         key=jax.random.key(k))[0]
  assert run(1) == run(1)
  assert run(1) != run(2)


def test_l1_and_bounds(toy):
  s, batch = toy
  # A huge L1 penalty drives every weight to (near) zero.
  weights, _ = search(s, ["a", "b"], batch, loss_fn, steps=15,
                      key=jax.random.key(0), l1=1e3)
  assert max(abs(w) for w in weights.values()) < 0.05
  # Candidates are clipped into the bounds before evaluation.
  # (Same names and steps as above: the compiled search is reused.)
  weights, _ = search(s, ["a", "b"], batch, loss_fn, steps=15,
                      key=jax.random.key(0), l1=0.0, bounds=(-0.2, 0.2))
  np.testing.assert_allclose(list(weights.values()), [0.2, 0.2], atol=1e-6)


def test_errors(toy):
  s, batch = toy
  with pytest.raises(ValueError, match="at least one"):
    search(s, [], batch, loss_fn, key=jax.random.key(0))
  with pytest.raises(ValueError, match="repeat"):
    search(s, ["a", "a"], batch, loss_fn, key=jax.random.key(0))
