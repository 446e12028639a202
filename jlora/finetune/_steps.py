"""The pieces of a fine-tuning run: mesh, model, jitted steps, evaluation."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora import models
from jlora.models import sharding
from jlora.data import masked_cross_entropy

# The offline demo's model: a small random Llama over the byte tokenizer's
# 259 ids (vocabulary rounded up to a multiple of 64).
DEMO_CONFIG = models.ModelConfig(
    vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, max_position_embeddings=4096)


def make_mesh(spec: str | None):
  """A mesh from a spec such as 'fsdp:8' (see `jlora.models.sharding`).

  None without a spec. On one process a mesh smaller than the host takes
  its first devices; across processes it spans every process's devices.
  """
  if not spec:
    return None
  need = math.prod(sharding.parse_spec(spec).values())
  devices = jax.devices()
  if jax.process_count() == 1 and need < len(devices):
    devices = devices[:need]
  return sharding.make_mesh(spec, devices)


def param_sharding(mesh):
  """The mesh strategy's rule for every parameter; None without a mesh."""
  return None if mesh is None else sharding.param_rule(mesh)


def load_model(args, mesh):
  """(model, params, tokenizer): the demo model or a HF checkpoint."""
  shardings = param_sharding(mesh)
  kw = dict(scan_layers=args.scan_layers, remat=_remat(args.remat),
            attention=args.attention)
  if args.model is None:
    model, params = models.from_config(DEMO_CONFIG, jax.random.key(args.seed),
                                       shardings=shardings, **kw)
    if args.quantize:
      params = jlora.quantize(params, args.quantize)
    return model, params, jlora.data.byte_tokenizer()
  dtypes = (dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) if args.bf16
            else {})
  model, params = models.from_pretrained(
      args.model, shardings=shardings, quantize=args.quantize, **dtypes, **kw)
  return model, params, models.load_tokenizer(args.model)


def _remat(remat: str):
  return tuple(remat.split("+")) if "+" in remat else remat


def on_mesh(tree, mesh):
  """`tree` on `mesh` (unsharded leaves replicated), and its shardings."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
      else replicated, tree)
  return jax.device_put(tree, shardings), shardings


def _head(params: Any, config) -> tuple[jax.Array, str]:
  """The output projection as a plain array (a LoRA head merged)."""
  if config.tie_word_embeddings:
    leaf, layout = params["model"]["embed_tokens"]["embedding"], "embedding"
  else:
    leaf, layout = params["lm_head"]["kernel"], "kernel"
  return jlora.merge(leaf), layout


def make_steps(model, tx, *, ce_chunk: int = 0, dropout_key=None,
               out_shardings=None, mesh=None):
  """Jitted `train_step(trainable, frozen, opt_state, batch, step)` (adapter
  dropout keyed by `fold_in(dropout_key, step)` when a key is given) and
  `eval_step(trainable, frozen, batch) -> (loss sum, token count)`, and the
  LoRA-aware forward. With a `mesh`, both steps trace under
  `jax.set_mesh(mesh)`, so Mixture-of-Experts blocks route each device's own
  tokens."""
  forward = jlora.wrap(model.apply)

  def token_losses(trainable, frozen, batch, key):
    params = jlora.combine(trainable, frozen)
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    if key is not None:
      kw["lora_rng"] = key
    if ce_chunk:
      h = forward({"params": params}, batch["input_ids"], return_hidden=True,
                  **kw)
      head, layout = _head(params, model.config)
      return models.chunked_cross_entropy(
          h, head, batch["targets"], where=batch["loss_mask"],
          chunk_size=ce_chunk, head_layout=layout)
    logits = forward({"params": params}, batch["input_ids"], **kw)
    return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])

  @functools.partial(jax.jit, donate_argnums=(0, 2),
                     out_shardings=out_shardings)
  def train_step(trainable, frozen, opt_state, batch, step):
    # The key is made inside the step: a key computed outside on one device
    # would be one more transfer racing the step's collectives.
    key = (None if dropout_key is None else
           jax.random.fold_in(dropout_key, step))
    loss, grads = jax.value_and_grad(token_losses)(trainable, frozen, batch,
                                                   key)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  @jax.jit
  def eval_step(trainable, frozen, batch):
    count = jnp.sum(batch["loss_mask"])
    return token_losses(trainable, frozen, batch, None) * count, count

  return _under(mesh, train_step), _under(mesh, eval_step), forward


def _under(mesh, fn):
  """`fn` called (and so traced) under `jax.set_mesh(mesh)`; `fn` itself
  without a mesh."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return call


def evaluate(eval_step, trainable, frozen, batches, put) -> float:
  """Mean loss per counted token over the held-out batches."""
  total = count = 0.0
  for b in batches:
    s, c = eval_step(trainable, frozen, put(b))
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def plot_curve(losses, evals, path) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: skipping the loss-curve PNG"
          " (pip install matplotlib)")
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="train loss")
  ax.plot([s for s, _ in evals], [v for _, v in evals], "o-",
          label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / target token)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
