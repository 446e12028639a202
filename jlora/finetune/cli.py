"""jlora-finetune: LoRA fine-tuning of a causal LM on text, instruction or chat data.

Offline by default: a small random Llama (`DEMO_CONFIG`) with a byte-level
tokenizer learns the shipped instruction dataset (400 chats, loss on the
assistant turns only), on CPU in a few minutes. Real use names a HuggingFace
checkpoint (directory or hub id) and a dataset:

  jlora-finetune                                         # offline demo
  jlora-finetune --model Qwen/Qwen2.5-0.5B-Instruct --data chat.jsonl \\
      --seq-len 2048 --batch 8 --steps 1000 --bf16 --merged
  jlora-finetune --model DIR --data pc.parquet --quantize nf4 --mesh data:8

Data (`jlora.data`): .jsonl / .json / .parquet / .txt in the formats "text",
"prompt_completion" or "messages" (the tokenizer's chat template), tokenized
once and cached, over-long examples handled by --truncation (counts printed),
split into training and held-out examples, and packed first-fit decreasing
into rows of --seq-len tokens whose documents never attend to each other
(--no-packing: one example per row). Training: `jlora.apply` adapters, AdamW
with warmup and cosine decay in a jitted step through `jlora.wrap`, a
progress bar, held-out loss every --eval-every steps, checkpoints every
--save-every steps (`jlora.CheckpointManager`, with the data position, so
--resume continues exactly). Written to --out: metrics.json, loss_curve.png,
adapter_peft/ (`jlora.peft.save`: `peft.PeftModel.from_pretrained` loads it),
adapter_orbax/ (`jlora.save_adapter`), checkpoints/, and with --merged a
merged transformers checkpoint merged/ (`jlora.models.save_pretrained`).
"""

from __future__ import annotations

import argparse
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
import jlora.data
import jlora.peft
from jlora import models
from jlora.models import sharding
from jlora.finetune import _steps
from jlora.finetune._steps import DEMO_CONFIG

__all__ = ["DEMO_CONFIG", "main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="jlora-finetune", description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g = p.add_argument_group("model")
  g.add_argument("--model", default=None,
                 help="HF checkpoint directory or hub id; default: a small"
                      " random Llama with a byte tokenizer (offline demo)")
  g.add_argument("--bf16", action="store_true",
                 help="bfloat16 compute and base params (--model only)")
  g.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None,
                 help="QLoRA: quantize the base's kernels")
  g.add_argument("--scan-layers", action="store_true",
                 help="one nn.scan over the layers (faster compiles)")
  g.add_argument("--remat", default="none",
                 help="what the backward pass keeps: " +
                      ", ".join(models.REMAT_POLICIES) +
                      ", or checkpoint names joined by '+'")
  g.add_argument("--ce-chunk", type=int, default=0,
                 help="chunked cross-entropy over this many tokens (never"
                      " holds the full logits); 0: plain logits")
  g.add_argument("--attention", choices=("xla", "cudnn", "auto"),
                 default="xla")
  g.add_argument("--mesh", default=None,
                 help="strategy as a device mesh, e.g. 'data:8' (data"
                      " parallel), 'fsdp:8' (params, adapters and optimizer"
                      " state sharded), 'model:2' (tensor parallel) or a"
                      " combination such as 'data:2,fsdp:2,model:2'")
  g = p.add_argument_group("data")
  g.add_argument("--data", default=None,
                 help=".jsonl / .json / .parquet / .txt; default: the shipped"
                      " instruction dataset (jlora.data.demo_path())")
  g.add_argument("--format", default="auto",
                 choices=("auto",) + jlora.data.FORMATS)
  g.add_argument("--chat-template", default=None,
                 help="a Jinja chat template file to set on the tokenizer")
  g.add_argument("--train-on-prompt", action="store_true",
                 help="loss on every token, not only completions/assistant")
  g.add_argument("--seq-len", type=int, default=256,
                 help="tokens per row (packed rows hold several examples)")
  g.add_argument("--truncation", default="auto",
                 choices=("auto",) + jlora.data.POLICIES,
                 help="over-long examples: auto = split plain text into"
                      " pieces, keep the start of anything else (right)")
  g.add_argument("--no-packing", action="store_true",
                 help="one example per row, padded to --seq-len")
  g.add_argument("--heldout", type=float, default=0.1,
                 help="fraction of examples held out for evaluation")
  g.add_argument("--cache-dir", default="default",
                 help="tokenized-data cache; 'none' turns it off")
  g = p.add_argument_group("LoRA")
  g.add_argument("--rank", type=int, default=16)
  g.add_argument("--alpha", type=float, default=32.0)
  g.add_argument("--targets", default=None,
                 help="'all-linear' or a regex over param paths, e.g."
                      " '(q_proj|v_proj)/kernel'; default 'all-linear' with"
                      " --model, every kernel including lm_head for the demo"
                      " model (its random head is too small to fit)")
  g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r)")
  g.add_argument("--dora", action="store_true", help="DoRA magnitudes")
  g.add_argument("--dropout", type=float, default=0.0,
                 help="adapter dropout")
  g.add_argument("--init", default="default",
                 help="default, gaussian, pissa, pissa_niter_N or olora")
  g.add_argument("--loraplus-ratio", type=float, default=None,
                 help="LoRA+: b learns this many times faster than a")
  g = p.add_argument_group("training")
  g.add_argument("--lr", type=float, default=None,
                 help="peak learning rate; default 3e-3 for the demo model,"
                      " 2e-4 with --model")
  g.add_argument("--steps", type=int, default=200)
  g.add_argument("--batch", type=int, default=16, help="rows per step")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--eval-every", type=int, default=50)
  g.add_argument("--eval-batches", type=int, default=8)
  g.add_argument("--save-every", type=int, default=None,
                 help="checkpoint interval; default --eval-every")
  g.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out")
  g = p.add_argument_group("output")
  g.add_argument("--out", default="finetune_out")
  g.add_argument("--merged", action="store_true",
                 help="also write the merged model as a transformers"
                      " checkpoint (--out/merged)")
  g.add_argument("--sample-tokens", type=int, default=120,
                 help="tokens to generate from a held-out prompt at the end")
  return p.parse_args(argv)


def _check(args) -> None:
  for name in ("steps", "batch", "seq_len", "eval_every", "eval_batches",
               "rank"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got"
                       f" {getattr(args, name)}")
  if args.bf16 and args.model is None:
    raise SystemExit("--bf16 needs --model (the demo model is float32)")


def _data(args, tokenizer, shard, vocab_size):
  """Training rows and held-out batches, with what was done printed."""
  if args.chat_template:
    with open(args.chat_template, encoding="utf-8") as f:
      tokenizer.chat_template = f.read()
  source = args.data or jlora.data.demo_path()
  ds = jlora.data.load(
      source, tokenizer, format=args.format,
      train_on_prompt=args.train_on_prompt,
      cache_dir=None if args.cache_dir == "none" else args.cache_dir)
  ds.check_vocab(vocab_size)
  policy = args.truncation
  if policy == "auto":
    policy = "split" if ds.format == "text" else "right"
  ds, report = jlora.data.truncate(ds, args.seq_len, policy)
  print(f"examples: {report}")
  train, heldout = ds.split(args.heldout, seed=args.seed)
  arrange = jlora.data.pad if args.no_packing else jlora.data.pack
  rows, held_rows = arrange(train, args.seq_len), arrange(heldout,
                                                          args.seq_len)
  stats = rows.stats()
  print(f"rows: {len(train):,} training examples in {stats['rows']:,} rows"
        f" of {args.seq_len} ({'padded' if args.no_packing else 'packed'},"
        f" {100 * stats['fill']:.1f}% real tokens); {len(heldout):,}"
        f" held-out examples in {len(held_rows):,} rows")
  evals = jlora.data.eval_batches(held_rows, args.batch,
                                  max_batches=args.eval_batches,
                                  shard_index=shard[0], shard_count=shard[1])
  return ds, heldout, rows, evals, report, stats


def main(argv=None) -> dict:
  args = parse_args(argv)
  _check(args)
  demo = args.model is None
  lr = args.lr if args.lr is not None else (3e-3 if demo else 2e-4)
  targets = args.targets or ("/kernel$" if demo else "all-linear")
  save_every = args.save_every or args.eval_every
  mesh = _steps.make_mesh(args.mesh)
  if mesh is not None:
    try:
      sharding.batch_size_per_process(args.batch, mesh)
    except ValueError as e:
      raise SystemExit(f"--batch: {e}") from None
  shard = (jax.process_index(), jax.process_count())
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)

  model, params, tokenizer = _steps.load_model(args, mesh)
  _, heldout, rows, eval_batches, report, pack_stats = _data(
      args, tokenizer, shard, model.config.vocab_size)

  key_lora, key_sample, key_dropout = jax.random.split(
      jax.random.key(args.seed + 1), 3)
  lp = jlora.apply(params, rank=args.rank, alpha=args.alpha, targets=targets,
                   key=key_lora, rslora=args.rslora, dora=args.dora,
                   dropout=args.dropout, init=args.init)
  count = jlora.count(lp)
  print(f"LoRA r={args.rank} alpha={args.alpha:g} on {targets!r}:"
        f" {count.trainable:,} trainable of {count.total:,} params"
        f" ({100 * count.fraction:.2f}%)")
  trainable, frozen = jlora.partition(lp)

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, args.steps // 20), decay_steps=args.steps,
      end_value=lr / 10)
  make_tx = lambda lr: optax.adamw(lr, weight_decay=0.0)
  inner = (make_tx(schedule) if args.loraplus_ratio is None else
           jlora.loraplus_optimizer(make_tx, schedule,
                                    ratio=args.loraplus_ratio))
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  opt_state = tx.init(trainable)
  out_shardings = None
  if mesh is not None:
    # Pinning the new state to the old one's shardings keeps the second step
    # from compiling again for whatever layout XLA picked for the first.
    trainable, train_sharding = _steps.on_mesh(trainable, mesh)
    opt_state, opt_sharding = _steps.on_mesh(opt_state, mesh)
    out_shardings = (train_sharding, opt_sharding, NamedSharding(mesh, P()))
  train_step, eval_step, forward = _steps.make_steps(
      model, tx, ce_chunk=args.ce_chunk,
      dropout_key=key_dropout if args.dropout > 0 else None,
      out_shardings=out_shardings, mesh=mesh)

  batch_sharding = (None if mesh is None else NamedSharding(
      mesh, sharding.batch_spec(mesh)))

  def put(batch):
    if batch_sharding is None:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    if shard[1] > 1:
      return {k: jax.make_array_from_process_local_data(batch_sharding, v)
              for k, v in batch.items()}
    return {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}

  data_iter = iter(jlora.data.train_batches(
      rows, args.batch, seed=args.seed, shard_index=shard[0],
      shard_count=shard[1]))
  ckpt = jlora.CheckpointManager(os.path.join(out, "checkpoints"),
                                 max_to_keep=2)
  start, losses, evals = 0, [], []
  if args.resume and ckpt.latest_step() is not None:
    restored = ckpt.restore(like=(trainable, opt_state))
    trainable, opt_state = restored.trainable, restored.opt_state
    start = restored.step
    data_iter.set_state(restored.extra["data"])
    losses = list(restored.extra["losses"])
    evals = [tuple(e) for e in restored.extra["evals"]]
    print(f"resumed from step {start} ({ckpt.directory})")
  elif ckpt.latest_step() is not None:
    raise SystemExit(f"{out}/checkpoints holds a run (step"
                     f" {ckpt.latest_step()}); pass --resume to continue it"
                     " or choose another --out")
  if start >= args.steps:
    print(f"the run already has {start} of --steps {args.steps}")

  if not evals:
    evals = [(0, _steps.evaluate(eval_step, trainable, frozen, eval_batches,
                                 put))]
  loss_before = evals[0][1]
  print(f"before: held-out loss {loss_before:.4f}, perplexity"
        f" {math.exp(loss_before):.2f}")

  # The step is dispatched asynchronously: the next batch is cut and put on
  # the device while it runs, and the host reads a loss back only every
  # `log_every` steps, so the accelerator never waits on Python.
  log_every, rate, real_tokens = 10, 0.0, 0
  pending = next(data_iter) if start < args.steps else None
  pending_state = data_iter.get_state()
  pending_dev = None if pending is None else put(pending)
  step_losses = []
  bar = tqdm(range(start + 1, args.steps + 1), desc="train", unit="step",
             initial=start, total=args.steps)
  started = None
  for step in bar:
    batch, batch_state = pending_dev, pending_state
    tokens = int((pending["segment_ids"] > 0).sum()) * shard[1]
    trainable, opt_state, loss = train_step(trainable, frozen, opt_state,
                                            batch, step)
    if step < args.steps:
      pending = next(data_iter)
      pending_state = data_iter.get_state()
      pending_dev = put(pending)
    step_losses.append(loss)
    if started is None:  # the first step compiles; time the rest
      loss.block_until_ready()
      started = time.perf_counter()
    else:
      real_tokens += tokens
    evaluate_now = step % args.eval_every == 0 or step == args.steps
    if evaluate_now:
      evals.append((step, _steps.evaluate(eval_step, trainable, frozen,
                                          eval_batches, put)))
    if step % log_every == 0 or evaluate_now:
      last = float(loss)  # waits for the step
      if real_tokens:
        rate = real_tokens / (time.perf_counter() - started)
      bar.set_postfix(loss=f"{last:.3f}", heldout=f"{evals[-1][1]:.3f}",
                      tok_s=f"{rate:,.0f}")
    if step % save_every == 0 or step == args.steps:
      losses += [float(x) for x in jax.device_get(step_losses)]
      step_losses = []
      state = (trainable, opt_state)
      ckpt.save(step, trainable=state[0], opt_state=state[1],
                extra={"data": batch_state, "losses": losses,
                       "evals": [list(e) for e in evals]}, force=True)
  bar.close()
  losses += [float(x) for x in jax.device_get(step_losses)]
  ckpt.close()

  loss_after = evals[-1][1]
  print(f"after:  held-out loss {loss_after:.4f}, perplexity"
        f" {math.exp(loss_after):.2f}")
  wrote_png = _steps.plot_curve(losses, evals,
                                os.path.join(out, "loss_curve.png"))
  lp = jlora.combine(trainable, frozen)
  name = args.model or "jlora-demo-byte-llama"
  jlora.save_adapter(os.path.join(out, "adapter_orbax"), lp, overwrite=True,
                     metadata={"model": name, "steps": args.steps, "lr": lr})
  jlora.peft.save(lp, os.path.join(out, "adapter_peft"),
                  base_model_name_or_path=args.model)
  written = ["adapter_orbax/", "adapter_peft/", "metrics.json"]
  if args.merged:
    models.save_pretrained(os.path.join(out, "merged"), model, lp,
                           tokenizer=tokenizer)
    written.append("merged/")
  metrics = {
      "loss_before": loss_before, "loss_after": loss_after,
      "ppl_before": math.exp(loss_before), "ppl_after": math.exp(loss_after),
      "train_loss_first": losses[0] if losses else None,
      "train_loss_last": losses[-1] if losses else None,
      "tokens_per_s": rate, "steps": args.steps, "seq_len": args.seq_len,
      "batch": args.batch, "packing": not args.no_packing,
      "rows": pack_stats["rows"], "fill": pack_stats["fill"],
      "examples": vars(report), "evals": [list(e) for e in evals],
      "model": name, "lr": lr, "targets": targets, "rank": args.rank}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  if wrote_png:
    written.insert(0, "loss_curve.png")
  print(f"wrote {', '.join(written)} to {out}")
  if args.sample_tokens:
    _sample(model, lp, forward, tokenizer, heldout, args.sample_tokens,
            key_sample)
  return metrics


def _sample(model, lp, forward, tokenizer, heldout, new_tokens, key) -> None:
  """Continues a held-out example's prompt (its text's start, for text)."""
  ids, mask = heldout[0]
  first = int(np.argmax(mask[1:])) + 1 if mask[1:].any() else 1
  cut = min(48, len(ids) - 1) if mask.all() else first
  prompt = np.asarray(ids[:cut])[None]
  out = models.generate(model, lp, jnp.asarray(prompt),
                        max_new_tokens=new_tokens, key=key, temperature=0.7,
                        top_k=40, apply_fn=forward)
  new = np.asarray(out[0, cut:])
  # Stop at the first special token (end of text, end of turn), included.
  special = set(getattr(tokenizer, "all_special_ids", ())) | set(
      getattr(tokenizer, "added_tokens_decoder", {}))
  ends = [k for k, t in enumerate(new.tolist()) if t in special]
  if ends:
    new = new[:ends[0] + 1]
  print("--- sample (prompt | continuation) ---")
  print(tokenizer.decode(prompt[0]) + " | " + tokenizer.decode(new))


def run() -> None:
  """The console script's entry point: bad data or a missing file ends the
  command with its message (file and line), not a traceback."""
  try:
    main()
  except (jlora.data.DataError, jlora.data.TemplateError,
          FileNotFoundError) as e:
    raise SystemExit(f"jlora-finetune: error: {e}") from None


if __name__ == "__main__":
  run()
