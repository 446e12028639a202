"""QLoRA quality: LoRA loss curves on an NF4 or FP8 base vs the bf16 base.

A small byte-level Llama (`jlora.models`) is first trained in full on one
half of the bundled corpus (examples/data/tiny_corpus.txt), so the base is a
trained model rather than noise. Its kernels are then stored in bf16, in NF4
with double quantization, or in FP8 e4m3 (`jlora.quant.quantize_fp8`, with
``product="fp8"``: activations and gradients quantized as on an FP8 GPU, in
the exact float32 emulation on CPU), and a LoRA adapter (same init, same
batches) is trained on the other half of the text. The table compares each
loss curve with the bf16 one at equal steps. Runs on CPU in a few minutes.

  PYTHONPATH=. python benchmarks/qlora_quality.py [--bases bf16,nf4,fp8]
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
# Base kernels: name -> params transform ("fp8t": one FP8 scale per tensor).
BASES = {
    "bf16": lambda p: p,
    "nf4": lambda p: jlora.quantize(p, "nf4", double_quant=True),
    "fp8": lambda p: jlora.quant.quantize_fp8(p, product="fp8"),
    "fp8t": lambda p: jlora.quant.quantize_fp8(p, scaling="tensor",
                                               product="fp8"),
    # The LM head in FP8 too (its logits and the hidden states' gradient).
    "fp8h": lambda p: jlora.quant.quantize_fp8(
        p, product="fp8", targets=("all-linear", r"lm_head/kernel")),
}
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
  p.add_argument("--bases", default="bf16,nf4,fp8",
                 help="comma-separated from " + ",".join(BASES))
  p.add_argument("--json", default=None)
  args = p.parse_args()
  bases = args.bases.split(",")
  if bases[0] != "bf16" or set(bases) - set(BASES):
    raise SystemExit(f"--bases must start with bf16 and use {sorted(BASES)}")

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

  # 2. LoRA on the second half, bf16 base vs quantized bases, same init and
  # data.
  data = batches(second, args.steps, 16, 128, seed=2)
  curves = {}
  for name in bases:
    base = BASES[name](bf16)
    lp = jlora.apply(base, rank=args.rank, alpha=2.0 * args.rank,
                     key=jax.random.key(3))
    trainable, frozen = jlora.partition(lp)
    curves[name] = train(jlora.wrap(apply), trainable, frozen, data, 2e-3)

  window = max(args.steps // 10, 1)
  smooth = {k: np.convolve(v, np.ones(window) / window, "valid")
            for k, v in curves.items()}
  rel = {k: np.abs(v - smooth["bf16"]) / smooth["bf16"]
         for k, v in smooth.items() if k != "bf16"}
  print(f"base pretraining loss {base_losses[0]:.3f} -> {base_losses[-1]:.3f}"
        f" ({args.pretrain_steps} steps, full training)")
  print(f"{'step':>6}" + "".join(f"{k + ' base':>12}" for k in bases)
        + "".join(f"{k + ' diff':>11}" for k in rel))
  for i in np.linspace(0, len(smooth["bf16"]) - 1, 6).astype(int):
    print(f"{i + window:>6}" + "".join(f"{smooth[k][i]:>12.4f}" for k in bases)
        + "".join(f"{r[i]:>10.2%} " for r in rel.values()))
  for k, r in rel.items():
    print(f"{k}: max relative difference of the {window}-step moving averages"
          f" from bf16: {r.max():.2%}; final: {r[-1]:.2%}")
  summary = {k: dict(max_rel=float(r.max()), final_rel=float(r[-1]))
             for k, r in rel.items()}
  out = dict(curves={k: v.tolist() for k, v in curves.items()}, **summary)
  if "nf4" in summary:  # the keys earlier runs wrote
    out.update(summary["nf4"])
  print("JSON " + json.dumps(summary))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f)


if __name__ == "__main__":
  main()
