"""Fine-tune a causal language model with LoRA: train, evaluate, save, sample.

Offline by default: a small Llama with random weights
(`jlora.models.from_config`) learns the bundled corpus
(examples/data/tiny_corpus.txt) byte by byte, on CPU in about a minute, with
adapters on every kernel including lm_head. Real use loads a HuggingFace
checkpoint and its tokenizer:

  python examples/finetune_causal_lm.py                      # offline demo
  python examples/finetune_causal_lm.py --model Qwen/Qwen2.5-0.5B \\
      --data my.jsonl --seq-len 512 --batch 8 --steps 1000 --lr 2e-4
  python examples/finetune_causal_lm.py --mesh data:2,model:4  # 8 devices

Steps: tokenize and split the data (90% train, 10% held out), `jlora.apply`
adapters to the targeted kernels, train the `jlora.partition`ed trainable half
with optax in a jitted step through `jlora.wrap(model.apply)`, evaluate loss
and perplexity on the held-out split before and after, then write to --out:
loss_curve.png (when matplotlib is installed), adapter_orbax/
(`jlora.save_adapter`), adapter_peft/ (`jlora.peft.save`, loadable with
`peft.PeftModel.from_pretrained`) and metrics.json; and print a sample from
`jlora.models.generate` with the adapters kept factored.

A .jsonl dataset holds one JSON object per line with a "text" field; documents
are joined with the tokenizer's end-of-text token. A .txt file is one text.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import jlora
import jlora.peft
from jlora import models

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "tiny_corpus.txt")
# The offline demo's model: a small Llama over the 256 byte values.
TOY_CONFIG = models.ModelConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, max_position_embeddings=1024)


# --------------------------------------------------------------------- data


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255: nothing to download."""

  eos_token_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def read_texts(path: str) -> list[str]:
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    missing = [i for i, r in enumerate(rows) if "text" not in r]
    if missing:
      raise ValueError(f"{path}: lines {missing[:5]} have no 'text' field")
    return [r["text"] for r in rows]
  with open(path, encoding="utf-8") as f:
    return [f.read()]


def tokenize(texts: list[str], tokenizer) -> np.ndarray:
  """All documents as one token stream, joined by end-of-text tokens."""
  ids = []
  for text in texts:
    ids.extend(tokenizer.encode(text))
    if tokenizer.eos_token_id is not None:
      ids.append(tokenizer.eos_token_id)
  return np.asarray(ids, np.int32)


def random_windows(tokens: np.ndarray, rng: np.random.Generator, batch: int,
                   length: int) -> np.ndarray:
  """(batch, length + 1) windows at random offsets: inputs plus targets."""
  starts = rng.integers(0, len(tokens) - length - 1, size=batch)
  return np.stack([tokens[s:s + length + 1] for s in starts])


def eval_windows(tokens: np.ndarray, batch: int, length: int,
                 max_batches: int = 8) -> list[np.ndarray]:
  """Consecutive non-overlapping windows of the held-out stream."""
  n = min((len(tokens) - 1) // length, batch * max_batches) // batch * batch
  if n == 0:
    raise ValueError(
        f"the held-out split has {len(tokens)} tokens, too few for one batch"
        f" of {batch} x {length}; use more data, a smaller --batch or"
        " --seq-len")
  rows = np.stack([tokens[i * length:i * length + length + 1]
                   for i in range(n)])
  return [rows[i:i + batch] for i in range(0, n, batch)]


# -------------------------------------------------------------------- model


def make_mesh(spec: str | None):
  """'data:2,model:4' -> a Mesh of local devices; None without a spec."""
  if not spec:
    return None
  names, sizes = [], []
  for part in spec.split(","):
    name, _, size = part.partition(":")
    names.append(name.strip())
    sizes.append(int(size))
  if set(names) - {"data", "model"}:
    raise ValueError(f"--mesh axes must be 'data' and/or 'model', got {names}")
  if math.prod(sizes) > jax.device_count():
    raise ValueError(f"--mesh {spec} needs {math.prod(sizes)} devices; this"
                     f" host has {jax.device_count()}")
  # Auto axes: XLA propagates shardings from the params and the batch.
  return jax.make_mesh(
      tuple(sizes), tuple(names), devices=jax.devices()[:math.prod(sizes)],
      axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def param_sharding(mesh):
  """Kernels split along their output axis over 'model'; the rest replicated."""
  if mesh is None:
    return None
  model_size = dict(mesh.shape).get("model", 1)

  def rule(path: str, shape: tuple[int, ...]):
    if len(shape) >= 2 and model_size > 1 and shape[-1] % model_size == 0:
      spec = (None,) * (len(shape) - 1) + ("model",)
      return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())
  return rule


def load_model(args, mesh):
  shardings = param_sharding(mesh)
  if args.model is None:
    model, params = models.from_config(
        TOY_CONFIG, jax.random.key(args.seed), shardings=shardings)
    return model, params, ByteTokenizer()
  dtypes = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) if args.bf16 \
      else {}
  model, params = models.from_pretrained(args.model, shardings=shardings,
                                         **dtypes)
  return model, params, models.load_tokenizer(args.model)


# ----------------------------------------------------------------- training


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def on_mesh(tree, mesh):
  """`tree` on `mesh` (unsharded leaves replicated), and its shardings."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
      else replicated, tree)
  return jax.device_put(tree, shardings), shardings


def make_steps(model, tx, out_shardings=None):
  """Jitted train and eval steps; `out_shardings` pins the state's layout."""
  forward = jlora.wrap(model.apply)

  def loss_fn(trainable, frozen, batch):
    params = jlora.combine(trainable, frozen)
    return next_token_loss(forward({"params": params}, batch[:, :-1]),
                           batch[:, 1:])

  @functools.partial(jax.jit, donate_argnums=(0, 2),
                     out_shardings=out_shardings)
  def train_step(trainable, frozen, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return train_step, jax.jit(loss_fn), forward


def evaluate(eval_fn, trainable, frozen, batches, put) -> float:
  return float(np.mean([eval_fn(trainable, frozen, put(b)) for b in batches]))


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
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default=None,
                 help="HF checkpoint directory or hub id; default: a small"
                      " random Llama over bytes (offline)")
  p.add_argument("--data", default=DEFAULT_DATA, help=".txt or .jsonl")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--targets", default=None,
                 help="'all-linear' or a regex over param paths, e.g."
                      " '(q_proj|v_proj)/kernel'; default 'all-linear' with"
                      " --model, every kernel including lm_head for the"
                      " demo model (its random head is too small to fit)")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate; default 3e-3 for the demo model,"
                      " 2e-4 with --model")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--mesh", default=None,
                 help="e.g. 'data:2,model:4': batch over 'data', kernels"
                      " over 'model'")
  p.add_argument("--bf16", action="store_true",
                 help="bfloat16 compute and base params (--model only)")
  p.add_argument("--eval-every", type=int, default=100,
                 help="held-out evaluation interval in steps")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--sample-tokens", type=int, default=120)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="finetune_out")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  lr = args.lr if args.lr is not None else (3e-3 if args.model is None
                                            else 2e-4)
  targets = args.targets or ("all-linear" if args.model else "/kernel$")
  mesh = make_mesh(args.mesh)
  data_size = 1 if mesh is None else dict(mesh.shape).get("data", 1)
  if args.batch % data_size:
    raise ValueError(f"--batch {args.batch} must divide over the mesh's"
                     f" 'data' axis of size {data_size}")
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)

  model, params, tokenizer = load_model(args, mesh)
  tokens = tokenize(read_texts(args.data), tokenizer)
  split = int(0.9 * len(tokens))
  train_tokens, heldout = tokens[:split], tokens[split:]
  if len(train_tokens) <= args.seq_len + 1:
    raise ValueError(f"{args.data} gives {len(train_tokens)} training tokens;"
                     f" need more than --seq-len {args.seq_len}")
  eval_batches = eval_windows(heldout, args.batch, args.seq_len,
                              args.eval_batches)
  print(f"data: {len(train_tokens):,} train / {len(heldout):,} held-out"
        f" tokens from {args.data}")

  key_lora, key_sample = jax.random.split(jax.random.key(args.seed + 1))
  lp = jlora.apply(params, rank=args.rank, alpha=args.alpha,
                   targets=targets, key=key_lora)
  count = jlora.count(lp)
  print(f"LoRA r={args.rank} alpha={args.alpha:g} on {targets!r}:"
        f" {count.trainable:,} trainable of {count.total:,} params"
        f" ({100 * count.fraction:.2f}%)")
  trainable, frozen = jlora.partition(lp)

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, args.steps // 20), decay_steps=args.steps,
      end_value=lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=0.0))
  opt_state = tx.init(trainable)
  out_shardings = None
  if mesh is not None:
    # Pinning the new state to the old one's shardings keeps the second step
    # from compiling again for whatever layout XLA picked for the first.
    trainable, train_sharding = on_mesh(trainable, mesh)
    opt_state, opt_sharding = on_mesh(opt_state, mesh)
    out_shardings = (train_sharding, opt_sharding, NamedSharding(mesh, P()))
  train_step, eval_fn, forward = make_steps(model, tx, out_shardings)

  batch_sharding = (None if mesh is None else NamedSharding(
      mesh, P("data" if "data" in mesh.axis_names else None, None)))

  def put(batch):
    batch = jnp.asarray(batch, jnp.int32)
    return batch if batch_sharding is None else jax.device_put(
        batch, batch_sharding)

  loss_before = evaluate(eval_fn, trainable, frozen, eval_batches, put)
  print(f"before: held-out loss {loss_before:.4f}, perplexity"
        f" {math.exp(loss_before):.2f}")

  rng = np.random.default_rng(args.seed)
  losses, evals = [], [(0, loss_before)]
  tokens_per_step = args.batch * args.seq_len
  bar = tqdm(range(1, args.steps + 1), desc="train", unit="step")
  started, rate = None, 0.0
  # The step is dispatched asynchronously: the next batch is cut and put on
  # the device while it runs, and the host reads a loss back only every
  # `log_every` steps, so the accelerator never waits on Python.
  log_every = 10
  pending = put(random_windows(train_tokens, rng, args.batch, args.seq_len))
  for step in bar:
    batch = pending
    trainable, opt_state, loss = train_step(trainable, frozen, opt_state,
                                            batch)
    if step < args.steps:
      pending = put(random_windows(train_tokens, rng, args.batch,
                                   args.seq_len))
    losses.append(loss)
    if step == 1:  # the first step compiles; time the rest
      loss.block_until_ready()
      started = time.perf_counter()
    evaluate_now = step % args.eval_every == 0 or step == args.steps
    if evaluate_now:
      evals.append((step, evaluate(eval_fn, trainable, frozen, eval_batches,
                                   put)))
    if step > 1 and (evaluate_now or step % log_every == 0):
      last = float(loss)  # waits for the step
      rate = (step - 1) * tokens_per_step / (time.perf_counter() - started)
      bar.set_postfix(loss=f"{last:.3f}", heldout=f"{evals[-1][1]:.3f}",
                      tok_s=f"{rate:,.0f}")
  bar.close()
  losses = [float(x) for x in jax.device_get(losses)]

  loss_after = evals[-1][1]
  print(f"after:  held-out loss {loss_after:.4f}, perplexity"
        f" {math.exp(loss_after):.2f}")

  png = os.path.join(out, "loss_curve.png")
  wrote_png = plot_curve(losses, evals, png)
  lp = jlora.combine(trainable, frozen)
  jlora.save_adapter(os.path.join(out, "adapter_orbax"), lp, overwrite=True,
                     metadata={"model": args.model or "toy-byte-llama",
                               "steps": args.steps, "lr": lr})
  jlora.peft.save(lp, os.path.join(out, "adapter_peft"),
                  base_model_name_or_path=args.model)
  metrics = {"loss_before": loss_before, "loss_after": loss_after,
             "ppl_before": math.exp(loss_before),
             "ppl_after": math.exp(loss_after),
             "train_loss_first": losses[0], "train_loss_last": losses[-1],
             "tokens_per_s": rate, "steps": args.steps}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  print(f"wrote {'loss_curve.png, ' if wrote_png else ''}adapter_orbax/,"
        f" adapter_peft/ and metrics.json to {out}")

  # A prompt from the held-out text, from a line start for the byte model.
  first = 0
  if isinstance(tokenizer, ByteTokenizer):
    first = next((i + 1 for i, t in enumerate(heldout[:512]) if t == 10), 0)
  prompt = heldout[first:first + 48][None]
  sample = models.generate(model, lp, jnp.asarray(prompt),
                           max_new_tokens=args.sample_tokens, key=key_sample,
                           temperature=0.7, top_k=40, apply_fn=forward)
  print("--- sample (prompt | continuation) ---")
  print(tokenizer.decode(prompt[0]) + " | "
        + tokenizer.decode(np.asarray(sample[0, prompt.shape[1]:])))
  return metrics


if __name__ == "__main__":
  main()
