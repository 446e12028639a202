"""Compare LoRA variants on a toy regression task (CPU, seconds).

A frozen two-layer MLP ("pretrained") is adapted towards a teacher whose
kernels differ from it by a low-rank update plus a little noise. Every variant
trains rank-4 adapters on both kernels with Adam for the same number of
steps; the table reports the final training and held-out losses, the mean
over a few seeds.

    python examples/variants.py [--steps 300] [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import variants

D_IN, HIDDEN, D_OUT, RANK, ALPHA = 32, 64, 8, 4, 8.0


def mlp(params, x):
  h = jax.nn.gelu(x @ params["fc1"]["kernel"])
  return h @ params["fc2"]["kernel"]


def make_task(key):
  """Base params, teacher params, and train/test data."""
  k = jax.random.split(key, 8)
  base = {"fc1": {"kernel": jax.random.normal(k[0], (D_IN, HIDDEN)) / D_IN**.5},
          "fc2": {"kernel": jax.random.normal(k[1], (HIDDEN, D_OUT)) / HIDDEN**.5}}

  def shift(key, w, rank=RANK, size=0.5):
    ku, kv, kn = jax.random.split(key, 3)
    u = jax.random.normal(ku, (w.shape[0], rank)) / w.shape[0]**.5
    v = jax.random.normal(kv, (rank, w.shape[1])) / rank**.5
    noise = 0.02 * jax.random.normal(kn, w.shape) / w.shape[0]**.5
    return w + size * u @ v + noise

  teacher = {"fc1": {"kernel": shift(k[2], base["fc1"]["kernel"])},
             "fc2": {"kernel": shift(k[3], base["fc2"]["kernel"])}}
  x_train = jax.random.normal(k[4], (512, D_IN))
  x_test = jax.random.normal(k[5], (512, D_IN))
  return base, (x_train, mlp(teacher, x_train)), (x_test, mlp(teacher, x_test))


def with_dora(tree):
  """DoRA: a magnitude per output column, starting at the base's norms."""
  def add_m(x):
    if not isinstance(x, jlora.LoRA):
      return x
    return dataclasses.replace(x, m=jnp.linalg.norm(x.w, axis=0))
  return jax.tree.map(add_m, tree, is_leaf=lambda x: isinstance(x, jlora.LoRA))


def variant_trees(base, key):
  """{name: (lora tree, LoRA+ ratio)} for each variant."""
  plain = jlora.apply(base, RANK, alpha=ALPHA, key=key)
  return {
      "LoRA": (plain, 1.0),
      "rsLoRA": (jlora.apply(base, RANK, alpha=ALPHA, rslora=True, key=key),
                 1.0),
      "LoRA+ (ratio 16)": (plain, 16.0),
      "PiSSA": (variants.pissa(plain), 1.0),
      "PiSSA (fast SVD)": (variants.pissa(plain, n_iter=2, key=key), 1.0),
      "OLoRA": (variants.olora(plain), 1.0),
      "DoRA": (with_dora(plain), 1.0),
  }


def train(tree, ratio, train_data, test_data, steps, lr):
  # Differentiate the whole tree: the wrapped forward pass gives the frozen
  # base a zero gradient, and the LoRA+ labels zero its update, while a DoRA
  # magnitude m (not in jlora.partition's trainable half) is trained.
  tx = variants.loraplus_optimizer(optax.adam, lr, ratio)
  forward = jlora.wrap(mlp)
  loss = lambda t, x, y: jnp.mean((forward(t, x) - y) ** 2)

  @jax.jit
  def run(tree):
    def step(carry, _):
      tree, state = carry
      value, grads = jax.value_and_grad(loss)(tree, *train_data)
      updates, state = tx.update(grads, state, tree)
      return (optax.apply_updates(tree, updates), state), value
    (tree, _), _ = jax.lax.scan(step, (tree, tx.init(tree)), None,
                                length=steps)
    return loss(tree, *train_data), loss(tree, *test_data)

  return [float(v) for v in run(tree)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--json", action="store_true", help="also print JSON")
  args = parser.parse_args()

  start = time.perf_counter()
  results: dict[str, list[list[float]]] = {}
  base_loss = []
  for seed in range(args.seeds):
    key_task, key_lora = jax.random.split(jax.random.key(seed))
    base, train_data, test_data = make_task(key_task)
    base_loss.append(float(jnp.mean((mlp(base, train_data[0]) -
                                     train_data[1]) ** 2)))
    for name, (tree, ratio) in variant_trees(base, key_lora).items():
      results.setdefault(name, []).append(
          train(tree, ratio, train_data, test_data, args.steps, args.lr))

  mean = lambda xs: sum(xs) / len(xs)
  print(f"toy regression, rank {RANK}, alpha {ALPHA}, Adam lr {args.lr},"
        f" {args.steps} steps, mean of {args.seeds} seeds"
        f" (base model loss {mean(base_loss):.4f})")
  print(f"{'variant':<18} {'train loss':>11} {'test loss':>11}")
  rows = {}
  for name, runs in results.items():
    train_l, test_l = mean([r[0] for r in runs]), mean([r[1] for r in runs])
    rows[name] = {"train_loss": train_l, "test_loss": test_l}
    print(f"{name:<18} {train_l:>11.5f} {test_l:>11.5f}")
  print(f"({time.perf_counter() - start:.1f} s)")
  if args.json:
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "lr": args.lr,
                      "results": rows}))


if __name__ == "__main__":
  main()
