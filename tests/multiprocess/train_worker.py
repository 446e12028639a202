"""One process of a multi-process LoRA run (jax.distributed on CPU).

  python train_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [SPEC [OTHER]]

Each process owns 4 // NUM_PROCESSES simulated CPU devices; together they
form a mesh of 4 devices under SPEC (default 'data:2,fsdp:2'). Every process
feeds only its own rows of each global batch. Process 0 writes the losses to
OUT_DIR/losses.json; the adapter is saved with jlora.save_adapter and a
CheckpointManager (written once, whatever the process count), then restored;
with OTHER, the adapter and training state that another run (of another
process count) saved there are restored here too and compared.
"""

import json
import os
import sys

pid, nproc, port, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                         sys.argv[4])
spec = sys.argv[5] if len(sys.argv) > 5 else "data:2,fsdp:2"
other = sys.argv[6] if len(sys.argv) > 6 else None
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={4 // nproc}")

import jax  # noqa: E402

if nproc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=nproc,
                             process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402

import jlora  # noqa: E402
from jlora import models  # noqa: E402
from jlora.models import sharding  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def main():
  mesh = sharding.make_mesh(spec)
  model, params = models.from_config(
      transformers.LlamaConfig(**TINY), jax.random.key(0), scan_layers=True,
      shardings=sharding.param_rule(mesh))
  lp = jlora.apply(params, rank=4, alpha=8.0, key=jax.random.key(1))
  trainable, frozen = jlora.partition(lp)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(trainable)
  forward = jlora.wrap(model.apply)

  def loss_fn(t, batch):
    logits = forward({"params": jlora.combine(t, frozen)}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch[:, 1:]).mean()

  @jax.jit
  def step(t, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(t, batch)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, loss

  rng = np.random.default_rng(0)
  per_process = sharding.batch_size_per_process(8, mesh)
  losses = []
  for _ in range(4):
    rows = rng.integers(0, TINY["vocab_size"], (8, 17), dtype=np.int32)
    mine = rows[pid * per_process:(pid + 1) * per_process]
    trainable, opt_state, loss = step(trainable, opt_state,
                                      sharding.global_batch(mine, mesh))
    losses.append(float(loss))

  lp = jlora.combine(trainable, frozen)
  jlora.save_adapter(os.path.join(out, "adapter"), lp)
  with jlora.CheckpointManager(os.path.join(out, "run")) as mgr:
    mgr.save(4, trainable=trainable, opt_state=opt_state)
    mgr.wait_until_finished()
  restored = jlora.load_adapter(os.path.join(out, "adapter"), params)
  same = all(
      bool(jnp.array_equal(a, b)) for a, b in zip(
          jax.tree.leaves(jlora.partition(restored)[0]),
          jax.tree.leaves(trainable)))
  # Another process count reduces in another order: equal up to rounding,
  # which Adam's m / sqrt(v) amplifies where a gradient is near zero (up to
  # ~1e-6 here). A wrong restore is off by the size of an update, ~1e-2.
  def equal(x, y):
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    return len(xs) == len(ys) and all(
        float(jnp.max(jnp.abs(a - b) - 1e-4 * jnp.abs(b), initial=0.0))
        <= 1e-5 for a, b in zip(xs, ys))

  other_equal = None
  if other is not None:
    theirs = jlora.load_adapter(os.path.join(other, "adapter"), params)
    with jlora.CheckpointManager(os.path.join(other, "run")) as mgr:
      state = mgr.restore(like=(trainable, opt_state))
    other_equal = (equal(jlora.partition(theirs)[0], trainable)
                   and equal(state.trainable, trainable)
                   and equal(state.opt_state, opt_state) and state.step == 4)
  if pid == 0:
    with open(os.path.join(out, "losses.json"), "w") as f:
      json.dump({"losses": losses, "restored_equal": same,
                 "other_equal": other_equal,
                 "processes": jax.process_count(),
                 "devices": jax.device_count()}, f)


if __name__ == "__main__":
  main()
