"""Gemma-2-shaped LoRA training step: jlora vs transformers + PEFT (+ compile).

Each system runs in its own subprocess (its own allocator, so its peak memory
is its own), one after another; then a table and JSON are printed.

  python benchmarks/gemma_step.py --shape 9b        # one H100/H200
  python benchmarks/gemma_step.py --shape tiny      # CPU smoke run

Systems:
  peft            transformers' Gemma2ForCausalLM + PEFT LoRA, eager attention
                  (transformers runs Gemma 2's attention soft-capping only in
                  eager, flash-attention-2 or flex; it refuses sdpa).
  peft_compile    the same under torch.compile.
  peft_compile_gc the same with gradient checkpointing.
  jlora systems   `jlora.models.CausalLM` with the Gemma 2 config (bf16,
                  scan over layers with sliding/global layers alternating,
                  XLA attention with the soft-cap: cuDNN has none), LoRA
                  through `jlora.apply` + `jlora.wrap`; named as in
                  benchmarks/train_speed.py: a preset ("mlp", "matmuls",
                  "full", ...) or a spec "remat=mlp/ce=1024". ce=n uses
                  `causal_lm_loss` (chunked, final soft-cap included), ce=0
                  full float32 logits.

Same step for all: batch x seq random tokens, next-token cross-entropy on the
soft-capped logits, AdamW (lr 1e-4), LoRA r=16 alpha=32 on q, k, v, o, gate,
up, down; random bf16 weights. Peak memory: the allocator's peak
(`peak_bytes_in_use`; PyTorch's `max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_speed  # noqa: E402  (system specs)
import train_step as ts  # noqa: E402  (run_systems, emit_json, ...)

SHAPES = {
  # google/gemma-2-9b.
  "9b": dict(hidden=3584, inter=14336, layers=42, heads=16, kv_heads=8,
             head_dim=256, vocab=256000, window=4096, scalar=256,
             attn_cap=50.0, final_cap=30.0, batch=2, seq=2048),
  # A window shorter than the sequence, so the sliding layers slide.
  "tiny": dict(hidden=64, inter=128, layers=4, heads=4, kv_heads=2,
               head_dim=16, vocab=512, window=16, scalar=16,
               attn_cap=50.0, final_cap=30.0, batch=2, seq=64),
}
TARGETS = ts.TARGETS
DEFAULT_SYSTEMS = {
  "9b": "peft_compile,peft,mlp,matmuls,full",
  "tiny": "peft_compile,peft,mlp,full",
}


def hf_config(s: dict):
  from transformers import Gemma2Config

  return Gemma2Config(
    hidden_size=s["hidden"], intermediate_size=s["inter"],
    num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
    num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
    vocab_size=s["vocab"], sliding_window=s["window"],
    query_pre_attn_scalar=s["scalar"],
    attn_logit_softcapping=s["attn_cap"],
    final_logit_softcapping=s["final_cap"],
    max_position_embeddings=max(8192, s["seq"]), pad_token_id=None,
    bos_token_id=None, eos_token_id=None, attn_implementation="eager")


def matmul_params(s: dict) -> int:
  """Weights used in matmuls: the projections and the (tied) head."""
  h, i, L, v = s["hidden"], s["inter"], s["layers"], s["vocab"]
  attn = h * s["head_dim"] * (2 * s["heads"] + 2 * s["kv_heads"])
  return L * (attn + 3 * h * i) + v * h


def floor_flops(s: dict) -> float:
  """Forward + input gradient of every matmul (the head included), plus
  attention's two products (non-causal, unwindowed), forward and backward."""
  tokens = s["batch"] * s["seq"]
  attention = (12 * s["batch"] * s["seq"] ** 2 * s["heads"] * s["head_dim"]
               * s["layers"])
  return 4 * matmul_params(s) * tokens + attention


# -- jlora ------------------------------------------------------------------------


def run_jlora(name: str, s: dict, rank: int, alpha: float, steps: int,
              warmup: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import CausalLM, ModelConfig

  opts = train_speed.parse_system(name)
  cfg = ModelConfig.from_hf(hf_config(s))
  model = CausalLM(cfg, jnp.bfloat16, jnp.bfloat16,
                   bool(opts.get("scan", 1)),
                   train_speed._remat_arg(opts["remat"]),
                   opts.get("attention", "xla"),
                   tuple(x for x in opts.get("offload", "").split("+") if x))
  tx = optax.adamw(1e-4)
  key = jax.random.key(0)
  ids = jax.random.randint(key, (s["batch"], s["seq"] + 1), 0, s["vocab"])
  inputs, labels = ids[:, :-1], ids[:, 1:]

  def make(key):
    params = model.init(key, inputs[:1, :8])["params"]
    lp = jlora.apply(params, rank=rank, alpha=alpha, key=key,
                     targets="|".join(TARGETS))
    trainable, frozen = jlora.partition(lp)
    return trainable, frozen, tx.init(trainable)

  step = train_speed.lora_step(model, tx, opts)

  t0 = time.perf_counter()
  shapes = jax.eval_shape(make, key)
  compiled = step.lower(shapes[0], shapes[2], shapes[1], inputs,
                        labels).compile()
  compile_s = time.perf_counter() - t0
  trainable, frozen, opt_state = jax.jit(make)(key)
  (trainable, opt_state), losses, rounds = train_speed.time_steps(
    compiled, (trainable, opt_state), (frozen, inputs, labels), steps, warmup)
  stats = jax.devices()[0].memory_stats() or {}
  step_s = min(rounds)
  return dict(
    system=name, options=opts, step_s=step_s, rounds_s=rounds,
    tokens_per_s=s["batch"] * s["seq"] / step_s,
    peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30, compile_s=compile_s,
    loss_first=losses[0], loss_last=losses[-1],
    trainable=int(sum(x.size for x in jax.tree.leaves(trainable))))


# -- PyTorch / PEFT ------------------------------------------------------------------


def run_peft(name: str, s: dict, rank: int, alpha: float, steps: int,
             warmup: int) -> dict:

  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import Gemma2ForCausalLM

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  # Built on the device in bf16: a 9B float32 model built on the host first
  # takes minutes and 37 GB of host memory.
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  with torch.device(device):
    model = Gemma2ForCausalLM(hf_config(s))
  torch.set_default_dtype(default)
  if name.endswith("_gc"):
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
  model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                           target_modules=list(TARGETS)))
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4)
  ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)
  inputs, labels = ids[:, :-1], ids[:, 1:]

  # Gemma 2's logits come soft-capped from the model itself.
  losses, step_s, peak = ts.torch_steps(
    model, opt, inputs, labels, device, warmup, steps,
    compile_=name.startswith("peft_compile"))
  return dict(system=name, options={}, step_s=step_s,
              tokens_per_s=s["batch"] * s["seq"] / step_s, peak_gib=peak,
              loss_first=losses[0], loss_last=losses[-1],
              trainable=sum(p.numel() for p in trainable))


# -- driver ------------------------------------------------------------------------


def child(args) -> None:
  s = SHAPES[args.shape]
  runner = run_peft if args.system.startswith("peft") else run_jlora
  result = runner(args.system, s, args.rank, args.alpha, args.steps,
                  args.warmup)
  print("RESULT " + json.dumps(result), flush=True)
  if args.matmul:
    print("MATMUL " + json.dumps({"tflops": ts.matmul_tflops()}), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="9b")
  p.add_argument("--systems", default=None,
                 help="comma-separated; default per shape: "
                 + json.dumps(DEFAULT_SYSTEMS))
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--timeout", type=float, default=600,
                 help="seconds per system")
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--system", help=argparse.SUPPRESS)
  p.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.system:
    return child(args)

  systems = (args.systems or DEFAULT_SYSTEMS[args.shape]).split(",")
  for name in systems:
    if not name.startswith("peft"):
      train_speed.parse_system(name)  # fail early on a bad spec
  # The matmul rate is measured by the first system's process.
  results, tflops = ts.run_systems(__file__, systems, ts.common_flags(args),
                                   args.timeout)
  s = SHAPES[args.shape]
  flops = floor_flops(s)
  ref = next((r for r in results
              if r["system"] == "peft_compile" and "error" not in r), None)
  lines = [
    (f"shape {args.shape}: {s}; LoRA r={args.rank} alpha={args.alpha}; bf16 "
     f"matmul {tflops or 0:.0f} TFLOP/s; floor {flops / 1e12:.1f} TFLOP/step"),
    (f"{'system':<18}{'step s':>9}{'tokens/s':>11}{'peak GiB':>9}{'floor':>8}"
     f"{'vs PEFT':>9}{'mem':>7}{'loss0->N':>18}"),
  ]
  lines.append("-" * len(lines[-1]))
  for r in results:
    if "error" in r:
      lines.append(f"{r['system']:<18} error: {r['error'][:300]}")
      continue
    floor = ts.floor_fraction(r, flops, tflops)
    vs = mem = "-"
    if ref is not None and r is not ref:
      r["vs_peft_compile"] = r["tokens_per_s"] / ref["tokens_per_s"]
      vs = f"{r['vs_peft_compile']:.2f}x"
      if ref["peak_gib"]:
        r["peak_vs_peft_compile"] = r["peak_gib"] / ref["peak_gib"]
        mem = f"{r['peak_vs_peft_compile']:.2f}x"
    lines.append(
      f"{r['system']:<18}{r['step_s']:>9.4f}{r['tokens_per_s']:>11,.0f}"
      f"{r['peak_gib']:>9.2f}{floor * 100:>7.1f}%{vs:>9}{mem:>7}"
      f"{r['loss_first']:>9.3f}->{r['loss_last']:.3f}")
  print("\n".join(lines), flush=True)
  ts.emit_json(dict(shape=args.shape, config=s, rank=args.rank,
                    alpha=args.alpha, steps=args.steps, warmup=args.warmup,
                    matmul_tflops=tflops, floor_tflop=flops / 1e12,
                    results=results, table="\n".join(lines)), args.json)


if __name__ == "__main__":
  main()
