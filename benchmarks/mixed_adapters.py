"""Mixed-adapter batches: 8 different adapters in one batch vs one adapter.

Serving and training with a different LoRA adapter per example
(`jlora.stack_adapters` + ``jlora.wrap(...)(..., adapter_ids=ids)``), against
the same batch run with one adapter and with the bare base, and against
HuggingFace PEFT's mixed-batch inference (``adapter_names=``) on PyTorch.

  python benchmarks/mixed_adapters.py --shape 1b        # on a GPU machine
  python benchmarks/mixed_adapters.py --shape tiny      # CPU smoke run

Workloads (Llama-shaped model, bf16, scan over layers, random weights; LoRA
r=16 alpha=32 on q, k, v, o, gate, up, down):
  prefill  forward of batch x seq tokens, logits of the last position (the
           prompt pass of serving; cuDNN causal attention on GPU), jitted.
  decode   one generated token per example with a KV cache: the time per
           token of `jlora.models.generate`, from two runs of different
           lengths (so the prompt pass cancels out).
  train    one AdamW step on batch x seq tokens (remat="matmuls", chunked
           cross-entropy), every adapter of the batch trained.

Systems:
  base     the bare base params (no adapter; prefill and decode only).
  one      one adapter on the whole batch (`jlora.wrap`).
  mixed8   8 adapters stacked, example k runs adapter k (ids = 0..7).
  peft_one / peft_mixed8   PEFT on transformers' LlamaForCausalLM (sdpa),
           eager, prefill: one active adapter, or ``adapter_names`` naming a
           different adapter per example.

The JAX systems share one process (timing only); PEFT runs in its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_step as ts  # noqa: E402  (SHAPES, TARGETS)

N_ADAPTERS = 8


def _timed(fn, *args, reps: int, rounds: int = 3) -> float:
  """Seconds per call: the fastest of `rounds` rounds of `reps` calls."""
  import jax

  jax.block_until_ready(fn(*args))  # compile and warm up
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = [fn(*args) for _ in range(reps)]
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / reps)
  return best


def run_jax(s: dict, rank: int, alpha: float, reps: int, decode_len: int,
            prompt_len: int) -> list[dict]:
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.node import is_lora
  from jlora.models import LlamaForCausalLM, ModelConfig, generate
  from jlora.models.losses import chunked_cross_entropy

  on_gpu = jax.default_backend() == "gpu"
  cfg = ModelConfig(
      vocab_size=s["vocab"], hidden_size=s["hidden"],
      intermediate_size=s["inter"], num_layers=s["layers"],
      num_heads=s["heads"], num_kv_heads=s["kv_heads"], rms_norm_eps=1e-5,
      max_position_embeddings=max(s["seq"], prompt_len + 2 * decode_len))
  attention = "cudnn" if on_gpu else "xla"
  # Prefill (no cache, no padding) runs cuDNN's causal kernel; decoding with
  # a KV cache takes `jax.nn.dot_product_attention`'s own choice.
  prefill_model = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True,
                                   "none", attention)
  infer_model = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True,
                                 "none", "auto" if on_gpu else "xla")
  train_model = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True,
                                 "matmuls", attention)
  batch, seq = s["batch"], s["seq"]
  key = jax.random.key(0)
  tokens = jax.random.randint(key, (batch, seq + 1), 0, s["vocab"])
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  params = jax.jit(lambda k: infer_model.init(k, inputs[:1, :8])["params"])(
      key)

  @jax.jit
  def make_adapter(k):
    lp = jlora.apply(params, rank=rank, alpha=alpha, key=k,
                     targets="|".join(ts.TARGETS))
    # Non-zero b so each adapter computes something of its own.
    return jax.tree.map(
        lambda n: dataclasses.replace(n, b=0.01 * jax.random.normal(
            jax.random.fold_in(k, 1), n.b.shape, n.b.dtype))
        if is_lora(n) else n, lp, is_leaf=is_lora)

  adapters = jlora.AdapterSet(params, {}, None)
  one = None
  for i in range(N_ADAPTERS):
    lp = make_adapter(jax.random.key(100 + i))
    one = lp if one is None else one
    adapters = jlora.add_adapter(adapters, f"task{i}", lp)
  stacked = jax.jit(jlora.stack_adapters)(adapters)
  ids = jnp.arange(batch, dtype=jnp.int32) % N_ADAPTERS
  trees = {"base": (params, None), "one": (one, None),
           "mixed8": (stacked, ids)}

  results = []

  # -- prefill: logits of the last position
  forward = jlora.wrap(prefill_model.apply)

  @jax.jit
  def prefill(tree, x, adapter_ids):
    kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    h = forward({"params": tree}, x, return_hidden=True, **kw)
    return h[:, -1] @ tree["lm_head"]["kernel"]

  for name, (tree, a_ids) in trees.items():
    t = _timed(prefill, tree, inputs, a_ids, reps=reps)
    results.append(dict(workload="prefill", system=name, step_s=t,
                        tokens_per_s=batch * seq / t))
    print(f"prefill {name}: {t * 1e3:.2f} ms", file=sys.stderr, flush=True)

  # -- decode: per-token time from two generation lengths
  prompt = inputs[:, :prompt_len]
  for name, (tree, a_ids) in trees.items():
    apply_fn = jlora.wrap(infer_model.apply)
    if a_ids is not None:
      apply_fn = functools.partial(apply_fn, adapter_ids=a_ids)
    times = {}
    for n in (decode_len, 2 * decode_len):
      times[n] = _timed(
          lambda tr, p, n=n: generate(infer_model, tr, p, max_new_tokens=n,
                                      apply_fn=apply_fn),
          tree, prompt, reps=max(1, reps // 4), rounds=2)
    per_token = (times[2 * decode_len] - times[decode_len]) / decode_len
    results.append(dict(workload="decode", system=name, step_s=per_token,
                        tokens_per_s=batch / per_token))
    print(f"decode {name}: {per_token * 1e3:.3f} ms/token", file=sys.stderr,
          flush=True)

  # -- train: one AdamW step, every adapter in the batch trained
  tx = optax.adamw(1e-4)
  train_forward = jlora.wrap(train_model.apply)

  def loss_fn(t, frozen, x, y, adapter_ids):
    p = jlora.combine(t, frozen)
    kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    h = train_forward({"params": p}, x, return_hidden=True, **kw)
    return chunked_cross_entropy(h, p["lm_head"]["kernel"], y,
                                 chunk_size=1024)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(t, opt_state, frozen, x, y, adapter_ids):
    loss, g = jax.value_and_grad(loss_fn)(t, frozen, x, y, adapter_ids)
    u, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, u), opt_state, loss

  for name in ("one", "mixed8"):
    tree, a_ids = trees[name]
    trainable, frozen = jlora.partition(tree)
    trainable = jax.tree.map(jnp.copy, trainable)  # donated below
    opt_state = tx.init(trainable)
    compiled = step.lower(trainable, opt_state, frozen, inputs, labels,
                          a_ids).compile()
    mem = compiled.memory_analysis()
    temp = None if mem is None else mem.temp_size_in_bytes / 2**30
    for _ in range(2):
      trainable, opt_state, loss = compiled(trainable, opt_state, frozen,
                                            inputs, labels, a_ids)
    best = float("inf")
    for _ in range(2):
      t0 = time.perf_counter()
      for _ in range(reps):
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen,
                                              inputs, labels, a_ids)
      jax.block_until_ready((trainable, loss))
      best = min(best, (time.perf_counter() - t0) / reps)
    results.append(dict(workload="train", system=name, step_s=best,
                        tokens_per_s=batch * seq / best, temp_gib=temp,
                        loss=float(loss)))
    print(f"train {name}: {best * 1e3:.1f} ms", file=sys.stderr, flush=True)
    del trainable, opt_state
  return results


def run_peft(s: dict, rank: int, alpha: float, reps: int) -> list[dict]:
  import peft
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  cfg = transformers.LlamaConfig(
      vocab_size=s["vocab"], hidden_size=s["hidden"],
      intermediate_size=s["inter"], num_hidden_layers=s["layers"],
      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
      max_position_embeddings=s["seq"], rms_norm_eps=1e-5)
  cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
  lcfg = peft.LoraConfig(r=rank, lora_alpha=alpha,
                         target_modules=list(ts.TARGETS), init_lora_weights=False)
  model = peft.get_peft_model(base, lcfg, adapter_name="task0")
  for i in range(1, N_ADAPTERS):
    model.add_adapter(f"task{i}", lcfg)
  model = model.to(device, torch.bfloat16).eval()
  batch, seq = s["batch"], s["seq"]
  x = torch.randint(0, s["vocab"], (batch, seq), device=device)
  names = [f"task{k % N_ADAPTERS}" for k in range(batch)]

  def timed(**kw):
    def call():
      with torch.no_grad():
        return model(input_ids=x, logits_to_keep=1, **kw).logits
    call()
    best = float("inf")
    for _ in range(3):
      if device == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      for _ in range(reps):
        call()
      if device == "cuda":
        torch.cuda.synchronize()
      best = min(best, (time.perf_counter() - t0) / reps)
    return best

  out = []
  for name, kw in (("peft_one", {}), ("peft_mixed8", {"adapter_names": names})):
    t = timed(**kw)
    out.append(dict(workload="prefill", system=name, step_s=t,
                    tokens_per_s=batch * seq / t))
    print(f"prefill {name}: {t * 1e3:.2f} ms", file=sys.stderr, flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=sorted(ts.SHAPES), default="1b")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--decode", type=int, default=64,
                 help="tokens of the shorter generation run")
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--peft", type=int, default=1, help="0: skip PEFT")
  p.add_argument("--json", default=None)
  p.add_argument("--part", choices=("jax", "peft"), help=argparse.SUPPRESS)
  args = p.parse_args()
  s = ts.SHAPES[args.shape]
  if args.part == "jax":
    rows = run_jax(s, args.rank, args.alpha, args.reps, args.decode,
                   args.prompt)
  elif args.part == "peft":
    rows = run_peft(s, args.rank, args.alpha, args.reps)
  if args.part:
    print("RESULT " + json.dumps(rows), flush=True)
    return

  rows = []
  for part in ("jax", "peft")[:1 + bool(args.peft)]:
    proc = subprocess.run(
        [sys.executable, __file__, "--part", part, "--shape", args.shape,
         "--rank", str(args.rank), "--alpha", str(args.alpha), "--reps",
         str(args.reps), "--decode", str(args.decode), "--prompt",
         str(args.prompt)], capture_output=True, text=True)
    found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if found:
      rows += json.loads(found[0][7:])
    else:
      tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
      rows.append(dict(workload=part, system="error", error=tail))

  ref = {(r["workload"], r["system"]): r for r in rows if "error" not in r}
  print(f"\nshape {args.shape}: {s}; rank {args.rank}; {N_ADAPTERS} adapters")
  header = (f"{'workload':<9}{'system':<13}{'ms / step':>11}{'tokens/s':>12}"
            f"{'vs one':>8}")
  print(header)
  print("-" * len(header))
  for r in rows:
    if "error" in r:
      print(f"{r['workload']:<9}error: {r['error'][:300]}")
      continue
    one = ref.get((r["workload"],
                   "peft_one" if r["system"].startswith("peft") else "one"))
    r["vs_one"] = r["step_s"] / one["step_s"] if one else None
    vs = f"{r['vs_one']:.3f}x" if one else "-"
    print(f"{r['workload']:<9}{r['system']:<13}{r['step_s'] * 1e3:>11.3f}"
          f"{r['tokens_per_s']:>12,.0f}{vs:>8}")
  out = dict(shape=args.shape, config=s, rank=args.rank,
             adapters=N_ADAPTERS, results=rows)
  ts.emit_json(out, args.json)


if __name__ == "__main__":
  main()
