"""Adapters as files: train a few LoRA steps, save the adapter, load it back.

Runs on CPU in seconds:  python examples/checkpointing.py
"""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.checkpoint import (CheckpointManager, load_adapter, read_metadata,
                              save_adapter)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(256, name="up")(x))
    return nn.Dense(16, name="down")(h)


def disk_size(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(directory) for f in files)


def tinyllama_adapter_bytes(rank=16, bytes_per_param=2) -> int:
  """Adapter size of TinyLlama-1.1B, r on q,k,v,o,gate,up,down, from shapes."""
  hidden, inter, layers, heads, kv_heads = 2048, 5632, 22, 32, 4
  kv = hidden // heads * kv_heads                   # 256
  shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
            (hidden, inter), (hidden, inter), (inter, hidden)]
  per_layer = sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)
  return layers * per_layer * bytes_per_param


def main():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (64, 32))
  y = jnp.tanh(x[:, :16])
  params = model.init(jax.random.key(1), x)["params"]

  trainable, frozen = jlora.partition(
      jlora.apply(params, rank=8, alpha=16.0, key=jax.random.key(2)))
  tx = optax.adam(1e-2)
  opt_state = tx.init(trainable)
  forward = jlora.wrap(model.apply)

  @jax.jit
  def step(trainable, opt_state):
    loss_fn = lambda t: jnp.mean(
        (forward({"params": jlora.combine(t, frozen)}, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  with tempfile.TemporaryDirectory() as tmp:
    # Resumable training: adapters + optimizer state every 10 steps.
    with CheckpointManager(os.path.join(tmp, "run"), max_to_keep=2,
                           save_interval_steps=10) as ckpt:
      for i in range(1, 31):
        trainable, opt_state, loss = step(trainable, opt_state)
        ckpt.save(i, trainable=trainable, opt_state=opt_state,
                  extra={"loss": float(loss)})
      print(f"trained 30 steps, loss {float(loss):.4f}; checkpoints at steps"
            f" {ckpt.all_steps()}")

    lp = jlora.combine(trainable, frozen)
    path = os.path.join(tmp, "adapter")
    save_adapter(path, lp, metadata={"task": "tanh regression", "steps": 30})
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"adapter on disk: {disk_size(path) / 1024:.1f} KiB (arrays"
          f" {adapter_bytes / 1024:.1f} KiB; the base, never written:"
          f" {base_bytes / 1024:.1f} KiB)")
    print(f"TinyLlama-1.1B, r=16 on q,k,v,o,gate,up,down, bf16:"
          f" {tinyllama_adapter_bytes() / 1e6:.1f} MB")
    print("metadata targets:", sorted(read_metadata(path)["targets"]))

    restored = load_adapter(path, params)  # onto the plain base params
    np.testing.assert_array_equal(forward({"params": restored}, x),
                                  forward({"params": lp}, x))
    print("restored adapter reproduces the outputs bit for bit")


if __name__ == "__main__":
  main()
