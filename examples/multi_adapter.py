"""Many adapters on one base: train two, switch, combine, LoRAHub, mix per example.

A small Flax MLP stands in for a pretrained model. Task "A" and task "B" are
the same network with two different rank-2 changes to its first layer; one
rank-4 adapter is trained for each. The two adapters then live in one
`AdapterSet` on the shared base: one jitted forward runs either of them
(switching retraces nothing), TIES merges them into one adapter, and
LoRAHub learns, from 32 examples of a third task C = A + 0.5 B, how to
combine them (weights close to 1 and 0.5). Last, one batch runs a different
adapter per example (A, B or the bare base) in a single jitted call. CPU,
seconds.

  python examples/multi_adapter.py --steps 300
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import lorahub
from jlora.adapters import add_adapter, select
from jlora.merging import combine_adapters


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.gelu(nn.Dense(self.hidden, name=f"layers_{i}")(x))
    return nn.Dense(4, name="head")(x)


def task_shift(params, key, scale):
  """A rank-2 change to the first hidden kernel: {path: delta}."""
  w = params["layers_0"]["kernel"]
  k1, k2 = jax.random.split(key)
  u = jax.random.normal(k1, (w.shape[0], 2)) / np.sqrt(w.shape[0])
  return {"layers_0": scale * u @ jax.random.normal(k2, (2, w.shape[1]))}


def shifted(params, *deltas):
  out = jax.tree.map(lambda x: x, params)
  for d in deltas:
    for name, delta in d.items():
      out[name] = {**out[name], "kernel": out[name]["kernel"] + delta}
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=1e-2)
  args = p.parse_args()

  keys = jax.random.split(jax.random.key(args.seed), 8)
  model = MLP()
  x = jax.random.normal(keys[0], (512, 16))
  params = model.init(keys[1], x)["params"]
  d_a = task_shift(params, keys[2], 1.0)
  d_b = task_shift(params, keys[3], 1.0)
  half_b = {k: 0.5 * v for k, v in d_b.items()}
  targets = {
      "A": model.apply({"params": shifted(params, d_a)}, x),
      "B": model.apply({"params": shifted(params, d_b)}, x),
      "C = A + 0.5 B": model.apply({"params": shifted(params, d_a, half_b)}, x),
  }
  forward = jlora.wrap(model.apply)

  # 1. One adapter per task, trained on its own.
  def train(y, key):
    lp = jlora.apply(params, rank=4, alpha=8.0, targets="layers_0/kernel",
                     key=key)
    trainable, frozen = jlora.partition(lp)
    tx = optax.adam(args.lr)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
      loss = lambda t: jnp.mean(
          (forward({"params": jlora.combine(t, frozen)}, x) - y) ** 2)
      value, grads = jax.value_and_grad(loss)(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, value

    for _ in range(args.steps):
      trainable, opt_state, _ = step(trainable, opt_state)
    return jlora.combine(trainable, frozen)

  lp_a = train(targets["A"], keys[4])
  lp_b = train(targets["B"], keys[5])

  # 2. Both on one base; the base arrays are shared, never copied.
  adapters = add_adapter(lp_a, "B", lp_b, base_name="A")
  assert select(adapters, "B")["layers_0"]["kernel"].w is (
      adapters.base["layers_0"]["kernel"])

  traces = []

  @jax.jit
  def mse_all(lp):
    traces.append(1)  # counts compilations
    pred = forward({"params": lp}, x)
    return jnp.stack([jnp.mean((pred - y) ** 2) for y in targets.values()])

  # 3. TIES: one adapter that keeps most of both.
  ties = combine_adapters(adapters, {"A": 1.0, "B": 1.0}, "ties_svd",
                          density=0.7)

  # 4. LoRAHub: weights for task C from 32 examples, no gradients.
  few = (x[:32], targets["C = A + 0.5 B"][:32])
  loss_c = lambda lp, batch: jnp.mean(
      (forward({"params": lp}, batch[0]) - batch[1]) ** 2)
  weights, hub = lorahub.search(adapters, ["A", "B"], few, loss_c, steps=40,
                                key=keys[6], l1=1e-3)

  rows = [("base (no adapter)", select(adapters, None)),
          ("adapter A", select(adapters, "A")),
          ("adapter B", select(adapters, "B")),
          ("switch back to A", select(adapters, "A")),
          ("TIES-SVD(A, B), density 0.7", ties),
          (f"LoRAHub A*{weights['A']:.2f} + B*{weights['B']:.2f}", hub)]
  names = list(targets)
  print(f"\n{'params':<34}" + "".join(f"{n:>16}" for n in names))
  print("-" * (34 + 16 * len(names)))
  for label, lp in rows:
    losses = np.asarray(mse_all(lp))
    print(f"{label:<34}" + "".join(f"{v:>16.2e}" for v in losses))
  print(f"\nmean squared error per task. The jitted evaluation compiled"
        f" {len(traces)} times for {len(rows)} rows: switching between A and B"
        " reuses one compilation; the bare base, the TIES and the LoRAHub"
        " adapters (other rank and alpha) are other pytree structures.")

  # 5. One batch, a different adapter per example: 0 -> A, 1 -> B, -1 -> base.
  stacked = jlora.stack_adapters(adapters, ["A", "B"])
  ids = jnp.asarray(np.arange(x.shape[0]) % 3 - 1, jnp.int32)  # -1, 0, 1, ...
  mixed = jax.jit(forward)({"params": stacked}, x, adapter_ids=ids)
  print("\nmixed batch (ids -1/0/1 = base/A/B): each example's output against"
        " its own adapter run alone")
  for i, label in ((-1, "base"), (0, "A"), (1, "B")):
    rows_i = np.asarray(ids) == i
    alone = forward({"params": select(adapters, None if i < 0 else
                                      ["A", "B"][i])}, x[rows_i])
    err = float(jnp.max(jnp.abs(mixed[rows_i] - alone)))
    print(f"  {label:<5} {int(rows_i.sum())} examples, max |difference|"
          f" {err:.1e}")


if __name__ == "__main__":
  main()
