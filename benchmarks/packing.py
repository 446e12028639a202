"""Packing pays: tokens/s of real (non-pad) tokens, packed rows vs padding.

Instruction-like lengths (log-normal, median --median tokens, clipped to
[--min-len, --seq]), one LoRA training step per batch, two systems side by
side, each in its own subprocess:

  packed  `jlora.data.pack` (first-fit decreasing) into rows of --seq tokens,
          --batch rows per step, documents kept apart by segment_ids (the
          attention mask goes to cuDNN as a bias)
  padded  --batch examples per step, padded to the batch's longest example
          rounded up to --pad-multiple (each distinct length compiled before
          timing), plain causal attention (cuDNN is_causal): the best case of
          padding

Both see the same example distribution, the same model, LoRA, remat and
chunked cross-entropy (loss on the completion: the last 60% of each example),
and the same worst-case shape (--batch x --seq), so the same peak memory.

  python benchmarks/packing.py --shape 8b              # GPU (H100/H200)
  python benchmarks/packing.py --shape tiny            # CPU smoke run
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import train_step as ts  # noqa: E402  (SHAPES, base_parser, emit_json, ...)

SYSTEMS = ("packed", "padded")
# Rows per step and the row length per shape (the lengths scale with --seq).
DEFAULTS = {"8b": (8, 2048), "1b": (16, 2048), "tiny": (4, 128)}


def lengths(n: int, median: float, sigma: float, lo: int, hi: int,
            seed: int) -> np.ndarray:
  """n example lengths (tokens incl. the last target): log-normal, clipped."""
  r = np.random.default_rng(seed)
  x = np.exp(r.normal(np.log(median), sigma, n))
  return np.clip(np.round(x), lo, hi).astype(np.int64)


def examples(args, n: int):
  """A `jlora.data.Tokenized` of random tokens with those lengths."""
  from jlora.data.dataset import from_examples
  s = ts.SHAPES[args.shape]
  r = np.random.default_rng(args.seed + 1)
  out = []
  for length in lengths(n, args.median, args.sigma, args.min_len,
                        args.seq + 1, args.seed):
    ids = r.integers(0, s["vocab"], length).astype(np.int32)
    mask = np.arange(length) >= 0.4 * length  # the completion
    out.append((ids, mask))
  return from_examples(out, np.arange(1, n + 1), "<lognormal>", "row", "pc")


def batches(args, system: str):
  """The timed batches (dicts of (B, T) host arrays) and their shapes."""
  import jlora.data as jd
  steps = args.warmup + args.steps
  if system == "packed":
    # Enough examples for the rows of every step (FFD over the pool).
    per_row = args.seq / (args.median * np.exp(args.sigma ** 2 / 2))
    pool = examples(args, int(steps * args.batch * per_row * 1.5) + 64)
    rows = jd.pack(pool, args.seq)
    order = np.random.default_rng(args.seed).permutation(len(rows))
    need = steps * args.batch
    if len(rows) < need:
      raise SystemExit(f"only {len(rows)} packed rows for {need}")
    out = []
    for k in range(steps):
      picked = [rows[int(i)] for i in order[k * args.batch:(k + 1) *
                                            args.batch]]
      out.append({f: np.stack([p[f] for p in picked]) for f in jd.FIELDS})
    return out
  pool = examples(args, steps * args.batch)
  out = []
  for k in range(steps):
    docs = range(k * args.batch, (k + 1) * args.batch)
    longest = max(len(pool[i][0]) - 1 for i in docs)
    width = min(args.seq, -(-longest // args.pad_multiple) * args.pad_multiple)
    rows = jd.pad(pool.select(list(docs)), width)
    out.append({f: np.stack([rows[i][f] for i in range(args.batch)])
                for f in jd.FIELDS})
  return out


def run(args, system: str) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import LlamaForCausalLM, ModelConfig
  from jlora.models.losses import chunked_cross_entropy

  s = ts.SHAPES[args.shape]
  on_gpu = jax.default_backend() == "gpu"
  cfg = ModelConfig(
      vocab_size=s["vocab"], hidden_size=s["hidden"],
      intermediate_size=s["inter"], num_layers=s["layers"],
      num_heads=s["heads"], num_kv_heads=s["kv_heads"], rms_norm_eps=1e-5,
      max_position_embeddings=args.seq)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  model = LlamaForCausalLM(cfg, dtype, dtype, True, args.remat,
                           "cudnn" if on_gpu else "xla")
  tx = optax.adamw(1e-4)

  def make(key):
    params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    lp = jlora.apply(params, rank=args.rank, alpha=args.alpha, key=key,
                     targets="|".join(ts.TARGETS))
    trainable, frozen = jlora.partition(lp)
    return trainable, frozen, tx.init(trainable)

  forward = jlora.wrap(model.apply)

  def loss_fn(t, frozen, b):
    p = jlora.combine(t, frozen)
    kw = {}
    if system == "packed":
      kw = dict(segment_ids=b["segment_ids"], positions=b["positions"])
    h = forward({"params": p}, b["input_ids"], return_hidden=True, **kw)
    return chunked_cross_entropy(h, p["lm_head"]["kernel"], b["targets"],
                                 where=b["loss_mask"], chunk_size=args.ce)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(t, opt_state, frozen, b):
    loss, g = jax.value_and_grad(loss_fn)(t, frozen, b)
    u, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, u), opt_state, loss

  data = batches(args, system)
  trainable, frozen, opt_state = jax.jit(make)(jax.random.key(0))
  put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  # Compile every shape the timed batches use, outside the timing.
  t0 = time.perf_counter()
  shapes = {}
  for b in data:
    shapes.setdefault(b["input_ids"].shape, b)
  for b in shapes.values():
    trainable, opt_state, loss = step(trainable, opt_state, frozen, put(b))
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  for b in data[:args.warmup]:
    trainable, opt_state, loss = step(trainable, opt_state, frozen, put(b))
  jax.block_until_ready(loss)
  timed = data[args.warmup:]
  rounds = []
  for _ in range(2):
    device = [put(b) for b in timed]
    jax.block_until_ready(device)
    t0 = time.perf_counter()
    for b in device:
      trainable, opt_state, loss = step(trainable, opt_state, frozen, b)
    jax.block_until_ready(loss)
    rounds.append(time.perf_counter() - t0)
  elapsed = min(rounds)
  real = sum(int((b["segment_ids"] > 0).sum()) for b in timed)
  slots = sum(b["input_ids"].size for b in timed)
  return dict(system=system, steps=len(timed), seconds=elapsed,
              rounds=rounds, real_tokens=real, slots=slots,
              real_tokens_per_s=real / elapsed, slots_per_s=slots / elapsed,
              fill=real / slots, step_s=elapsed / len(timed),
              shapes=sorted(int(k[1]) for k in shapes),
              docs_per_step=statistics.mean(
                  int(b["segment_ids"].max(axis=1).sum()) if system ==
                  "packed" else args.batch for b in timed),
              compile_s=compile_s, loss_last=float(loss))


def main() -> None:
  p = ts.base_parser(__doc__.splitlines()[0], "8b", SYSTEMS)
  p.add_argument("--batch", type=int, default=None,
                 help="rows (packed) / examples (padded) per step")
  p.add_argument("--seq", type=int, default=None, help="row length")
  p.add_argument("--median", type=float, default=None,
                 help="median example length; default 250 * seq / 2048")
  p.add_argument("--sigma", type=float, default=1.0,
                 help="log-normal sigma of the lengths")
  p.add_argument("--min-len", type=int, default=8)
  p.add_argument("--pad-multiple", type=int, default=None,
                 help="padded widths round up to this; default seq / 8")
  p.add_argument("--remat", default="mlp")
  p.add_argument("--ce", type=int, default=1024)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  batch, seq = DEFAULTS[args.shape]
  args.batch = args.batch or batch
  args.seq = args.seq or seq
  args.median = args.median or 250 * args.seq / 2048
  args.pad_multiple = args.pad_multiple or max(1, args.seq // 8)
  flags = [*ts.common_flags(args), "--batch", str(args.batch), "--seq",
           str(args.seq), "--median", str(args.median), "--sigma",
           str(args.sigma), "--min-len", str(args.min_len), "--pad-multiple",
           str(args.pad_multiple), "--remat", args.remat, "--ce",
           str(args.ce), "--seed", str(args.seed)]
  if args.system:
    print("RESULT " + json.dumps(run(args, args.system)), flush=True)
    return

  results, _ = ts.run_systems(__file__, args.systems.split(","), flags)
  ok = {r["system"]: r for r in results if "error" not in r}
  lens = lengths(100_000, args.median, args.sigma, args.min_len,
                 args.seq + 1, args.seed)
  model = {k: v for k, v in ts.SHAPES[args.shape].items()
           if k not in ("batch", "seq")}
  print(f"\nshape {args.shape}: {model}; batch {args.batch}"
        f" x {args.seq}; LoRA r={args.rank}; remat={args.remat};"
        f" lengths log-normal median {np.median(lens):.0f} mean"
        f" {lens.mean():.0f} p99 {np.percentile(lens, 99):.0f} max"
        f" {lens.max()}")
  header = (f"{'system':<8}{'step (s)':>10}{'real tok/s':>13}{'slots/s':>11}"
            f"{'fill':>7}{'docs/step':>11}{'widths':>22}{'vs padded':>11}")
  print(header)
  print("-" * len(header))
  for r in results:
    if "error" in r:
      print(f"{r['system']:<8} error: {r['error'][:200]}")
      continue
    vs = (f"{r['real_tokens_per_s'] / ok['padded']['real_tokens_per_s']:.2f}x"
          if "padded" in ok else "-")
    widths = ",".join(map(str, r["shapes"]))
    print(f"{r['system']:<8}{r['step_s']:>10.4f}"
          f"{r['real_tokens_per_s']:>13,.0f}{r['slots_per_s']:>11,.0f}"
          f"{r['fill']:>7.2f}{r['docs_per_step']:>11.1f}"
          f"{widths[:20]:>22}{vs:>11}")
  out = dict(shape=args.shape, config=model,
             batch=args.batch, seq=args.seq, median=args.median,
             sigma=args.sigma, pad_multiple=args.pad_multiple,
             remat=args.remat, rank=args.rank, results=results)
  if len(ok) == 2:
    out["speedup"] = (ok["packed"]["real_tokens_per_s"] /
                      ok["padded"]["real_tokens_per_s"])
  ts.emit_json(out, args.json)


if __name__ == "__main__":
  main()
