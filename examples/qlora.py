"""QLoRA on a small Llama: an NF4 base, LoRA adapters, training, re-merge (CPU).

A random Llama-shaped model (scanned layers, bf16) has its seven projections
stored in NF4 with double quantization; rank-8 adapters are trained on a toy
next-token rule through `jlora.wrap`, each kernel dequantized per use inside the
layer scan, the optimizer state kept in host memory. At the end the adapters
are fused into bf16 kernels, or fused and re-quantized for deployment.

    python examples/qlora.py [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import quant
from jlora.models import ModelConfig, from_config

TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def tree_mib(tree) -> float:
  return sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20


def batch(key, vocab, shift, n=8, length=33):
  """Random first tokens, each next one ``(5 * token + shift) % vocab``."""
  tokens = [jax.random.randint(key, (n,), 0, vocab)]
  for _ in range(length - 1):
    tokens.append((5 * tokens[-1] + shift) % vocab)
  return jnp.stack(tokens, axis=1)


def loss_fn(forward, params, ids):
  logits = forward({"params": params}, ids[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=60)
  args = p.parse_args()

  cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=384,
                    num_layers=4, num_heads=4, num_kv_heads=2)
  model, params = from_config(cfg, jax.random.key(0), dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16, scan_layers=True,
                              remat="full")
  key = jax.random.key(1)

  # 1. The base: NF4 with double quantization on the seven projections.
  qparams = quant.quantize(params, "nf4", targets=TARGETS)
  kernel = qparams["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  print(f"base {tree_mib(params):.2f} MiB bf16 -> {tree_mib(qparams):.2f} MiB"
        f" ({kernel}, {kernel.nbytes * 8 / kernel.size:.3f} bits/param)")

  # 2. Adapters on the quantized base; only they are trained.
  lp = jlora.apply(qparams, rank=8, alpha=16.0, targets=TARGETS, key=key)
  trainable, frozen = jlora.partition(lp)
  print(jlora.summary(lp).splitlines()[-1])
  forward = jlora.wrap(model.apply)
  tx = quant.host_offloaded(optax.adamw(1e-2))
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, ids):
    loss, grads = jax.value_and_grad(
        lambda t: loss_fn(forward, jlora.combine(t, frozen), ids))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  t0 = time.perf_counter()
  for i in range(args.steps):
    ids = batch(jax.random.fold_in(key, i), cfg.vocab_size, shift=7)
    trainable, opt_state, loss = step(trainable, opt_state, ids)
    if i % 20 == 0 or i == args.steps - 1:
      print(f"step {i:4d}  loss {float(loss):.3f}")
  print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s")

  # 3. Deploy: fuse in bf16 (jlora.merge) or fuse and re-quantize.
  lp = jlora.combine(trainable, frozen)
  test = batch(jax.random.key(99), cfg.vocab_size, shift=7)
  fused = jlora.merge(lp)
  requantized = quant.merge_and_quantize(lp)
  print(f"deployed: {tree_mib(fused):.2f} MiB fused bf16, or"
        f" {tree_mib(requantized):.2f} MiB fused and re-quantized")
  plain = model.apply  # model.apply takes plain arrays: dequantize first
  print(f"held-out loss: adapters {float(loss_fn(forward, lp, test)):.3f},"
        f" merged bf16 {float(loss_fn(plain, fused, test)):.3f}, merged NF4"
        f" {float(loss_fn(plain, quant.dequantize(requantized), test)):.3f}"
        f" (NF4 base before training"
        f" {float(loss_fn(plain, quant.dequantize(qparams), test)):.3f})")


if __name__ == "__main__":
  main()
