"""QLoRA quality: LoRA loss curves on an NF4 base vs the bf16 base, real text.

A small byte-level Llama (`jlora.models`) is first trained in full on one
half of the bundled corpus (examples/data/tiny_corpus.txt), so the base is a
trained model rather than noise. Its kernels are then stored in bf16, or in
NF4 with double quantization, and a LoRA adapter (same init, same batches)
is trained on the other half of the text. The table compares the two loss
curves at equal steps. Runs on CPU in a few minutes.

  PYTHONPATH=. python benchmarks/qlora_quality.py
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import models

CORPUS = os.path.join(os.path.dirname(__file__), "..", "examples", "data",
                      "tiny_corpus.txt")
CONFIG = models.ModelConfig(vocab_size=256, hidden_size=128,
                            intermediate_size=256, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=256)


def batches(tokens: np.ndarray, steps: int, batch: int, length: int, seed: int):
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - length - 1, (steps, batch))
  return np.stack([[tokens[s:s + length + 1] for s in row] for row in starts])


def loss_fn(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def train(forward, trainable, frozen, data, lr):
  tx = optax.adam(lr)
  state = tx.init(trainable)

  @jax.jit
  def step(t, state, ids):
    loss, g = jax.value_and_grad(
        lambda t: loss_fn(forward(jlora.combine(t, frozen), ids), ids))(t)
    u, state = tx.update(g, state, t)
    return optax.apply_updates(t, u), state, loss

  losses = []
  for ids in data:
    trainable, state, loss = step(trainable, state, jnp.asarray(ids))
    losses.append(float(loss))
  return np.array(losses)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pretrain-steps", type=int, default=600)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--json", default=None)
  args = p.parse_args()

  text = np.frombuffer(open(CORPUS, "rb").read(), np.uint8).astype(np.int32)
  first, second = text[:len(text) // 2], text[len(text) // 2:]
  model, params = models.from_config(CONFIG, jax.random.key(0))
  apply = lambda p, ids: model.apply({"params": p}, ids)

  # 1. A trained base: full training on the first half.
  pre = batches(first, args.pretrain_steps, 16, 128, seed=1)
  tx = optax.adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def full_step(p, state, ids):
    loss, g = jax.value_and_grad(lambda p: loss_fn(apply(p, ids), ids))(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, loss

  base_losses = []
  for ids in pre:
    params, state, loss = full_step(params, state, jnp.asarray(ids))
    base_losses.append(float(loss))
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

  # 2. LoRA on the second half, bf16 base vs NF4 base, same init and data.
  data = batches(second, args.steps, 16, 128, seed=2)
  curves = {}
  for name, base in [("bf16", bf16),
                     ("nf4", jlora.quantize(bf16, "nf4", double_quant=True))]:
    lp = jlora.apply(base, rank=args.rank, alpha=2.0 * args.rank,
                     key=jax.random.key(3))
    trainable, frozen = jlora.partition(lp)
    curves[name] = train(jlora.wrap(apply), trainable, frozen, data, 2e-3)

  window = max(args.steps // 10, 1)
  smooth = {k: np.convolve(v, np.ones(window) / window, "valid")
            for k, v in curves.items()}
  rel = np.abs(smooth["nf4"] - smooth["bf16"]) / smooth["bf16"]
  print(f"base pretraining loss {base_losses[0]:.3f} -> {base_losses[-1]:.3f}"
        f" ({args.pretrain_steps} steps, full training)")
  print(f"{'step':>6}{'bf16 base':>12}{'nf4 base':>12}{'rel diff':>10}")
  for i in np.linspace(0, len(rel) - 1, 6).astype(int):
    print(f"{i + window:>6}{smooth['bf16'][i]:>12.4f}{smooth['nf4'][i]:>12.4f}"
          f"{rel[i]:>9.2%}")
  print(f"max relative difference of the {window}-step moving averages:"
        f" {rel.max():.2%}; final: {rel[-1]:.2%}")
  out = dict(curves={k: v.tolist() for k, v in curves.items()},
             max_rel=float(rel.max()), final_rel=float(rel[-1]))
  print("JSON " + json.dumps(dict(max_rel=out["max_rel"],
                                  final_rel=out["final_rel"])))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f)


if __name__ == "__main__":
  main()
