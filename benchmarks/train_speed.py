"""LoRA training speed and memory of `jlora.models` options vs compiled PEFT.

Each system runs in its own subprocess (its own GPU allocator, so its peak
memory is its own) under its own timeout, one after another; then a table and
JSON are printed (and written with --json, after every system).

  python benchmarks/train_speed.py --shape 1b                 # H100
  python benchmarks/train_speed.py --shape 8b --systems peft_compile,attention+gate
  python benchmarks/train_speed.py --shape tiny               # CPU smoke run

jlora systems are `jlora.models.LlamaForCausalLM` (bf16, scan over layers,
cuDNN attention with is_causal on GPU) with LoRA through `jlora.apply` +
`jlora.wrap`, and differ in:
  remat    what the backward pass keeps ("none", "full", "attention",
           "attention+gate", "mlp", "matmuls", "dots"; see LlamaForCausalLM)
  ce       0: logits (B, T, vocab) in float32 + log-softmax cross-entropy;
           n: `jlora.models.losses.chunked_cross_entropy` over n-token chunks
  offload  checkpoint names kept in pinned host memory ("+"-joined)
  mb       micro-batches: gradient accumulation inside the jitted step over
           mb equal slices of the batch (same batch, loss and gradient)
  scan     1 (default): nn.scan over layers; 0: unrolled layers
  share    1 (default): adapters reading one input share one A product
           (`jlora.wrap(share_inputs=True)`); 0: one product per kernel
  flags    named XLA flag sets (XLA_FLAGS), e.g. notriton
  base     bf16 (default); fp8: the seven projections' kernels stored in
           FP8 e4m3, one power-of-two scale per output channel, products in
           FP8 on GPUs that have it (`jlora.quant.quantize_fp8`); fp8t: one
           scale per kernel (per layer), which XLA fuses whole into cuBLASLt;
           fp8k: fp8 with each kernel also stored transposed
           (`transposed_copy=True`), so neither product transposes it;
           fp8kh: fp8k with the LM head in FP8 too

A system is a preset name from VARIANTS or a spec such as
"remat=matmuls/ce=2048/offload=gate_proj+up_proj/mb=2" or
"remat=mlp/ce=1024/base=fp8". An FP8 system's base is generated leaf by
leaf (random N(0, 0.02^2) kernels quantized one at a time), so its process
peak is not the dense model's; it also records the e4m3 GEMM rate
(8192^3, both operands K-major "tn" and the kernel row-major "nn").

peft_compile is `train_step.run_peft`: HuggingFace PEFT on transformers'
LlamaForCausalLM (sdpa attention) under torch.compile, as in the anchors.

Same step for all: batch x seq random tokens, next-token cross-entropy, AdamW
(lr 1e-4), LoRA r=16 alpha=32 on q, k, v, o, gate, up, down. jlora steps are
dispatched back to back with donated buffers and no host sync inside the timed
loop (one sync at the end); two timed rounds, the faster reported, both kept.
Peak memory: the allocator's peak (`peak_bytes_in_use`; PyTorch's
`max_memory_allocated`), and for jlora also XLA's static footprint of the
step (arguments + temporaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trace_summary  # noqa: E402
import train_step as ts  # noqa: E402  (SHAPES, floor_flops, run_peft, ...)

SHAPES = ts.SHAPES
TARGETS = ts.TARGETS

# Presets: name -> options. "base" is the plain path (full logits).
VARIANTS = {
  "base": dict(remat="none", ce=0),
  "ce": dict(remat="none", ce=1024),
  "full": dict(remat="full", ce=1024),
  "dots": dict(remat="dots", ce=1024),
  "attention": dict(remat="attention", ce=1024),
  "attention+gate": dict(remat="attention+gate", ce=1024),
  "mlp": dict(remat="mlp", ce=1024),
  "matmuls": dict(remat="matmuls", ce=1024),
  "offload": dict(remat="attention", ce=1024, offload="gate_proj+up_proj"),
  # "matmuls" less q_proj and o_proj (recomputed: the smaller matmuls).
  "kv+mlp": dict(remat="k_proj+v_proj+attention+gate_proj+up_proj", ce=1024),
  # "matmuls" with up_proj in host memory instead of device memory.
  "offload_up": dict(remat="q_proj+k_proj+v_proj+attention+o_proj+gate_proj",
                     ce=1024, offload="up_proj"),
}
DEFAULT_SYSTEMS = {
  "1b": "peft_compile,base,ce,matmuls,attention,full",
  "8b": "peft_compile,mlp,kv+mlp,matmuls,attention+gate,full",
  "tiny": "peft_compile,base,ce,full,attention,attention+gate,matmuls,offload",
}


def parse_system(name: str) -> dict:
  """Options of a jlora system: a VARIANTS name or "k=v/k=v" spec."""
  if name in VARIANTS:
    return dict(VARIANTS[name])
  opts = dict(remat="none", ce=1024)
  for part in name.split("/"):
    key, _, value = part.partition("=")
    if key not in ("remat", "ce", "offload", "attention", "scan", "flags",
                   "mb", "share", "base"):
      raise SystemExit(
        f"unknown system {name!r}: use peft_compile, one of {sorted(VARIANTS)}"
        " or a spec like 'remat=matmuls/ce=2048/offload=up_proj/scan=0/"
        f"flags=notriton' (flags from {sorted(XLA_FLAGS)})"
      )
    opts[key] = int(value) if key in ("ce", "scan", "mb", "share") else value
  if opts.get("base", "bf16") not in FP8_BASES:
    raise SystemExit(f"unknown base {opts['base']!r}; use {sorted(FP8_BASES)}")
  for flag in opts.get("flags", "").split("+"):
    if flag and flag not in XLA_FLAGS:
      raise SystemExit(f"unknown flags {flag!r}; use {sorted(XLA_FLAGS)}")
  return opts


# base=... -> quantize_fp8 options of the projections' kernels (None: bf16):
# per channel, per tensor, per channel with a transposed copy (GEMM order
# for both products), and that with the LM head in FP8 too.
FP8_BASES = {"bf16": None, "fp8": dict(scaling="channel"),
             "fp8t": dict(scaling="tensor"),
             "fp8k": dict(scaling="channel", transposed_copy=True),
             "fp8kh": dict(scaling="channel", transposed_copy=True,
                           head=True)}

# XLA flag sets a system can name (flags=a+b), set in its process only.
XLA_FLAGS = {
  "notriton": "--xla_gpu_enable_triton_gemm=false",
  "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
  "nocmdbuf": "--xla_gpu_enable_command_buffer=",
  # cuBLAS reads each layer's kernel slice in place from the stacked array
  # (a scan's dynamic slice fused into the GEMM) instead of a copy per layer.
  "dsf": "--xla_gpu_enable_dynamic_slice_fusion=true",
  # Block-level (Triton) fusions where XLA's cost model prefers them, e.g.
  # a row reduction and the elementwise use of its result in one kernel.
  "blr": "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true",
  "heroless": "--xla_gpu_experimental_enable_triton_heroless_priority_fusion"
              "=true",
}


def _remat_arg(remat: str):
  """A preset name, a VARIANTS name, or "+"-joined checkpoint names."""
  from jlora.models.llama import REMAT_POLICIES
  if remat in REMAT_POLICIES:
    return remat
  if remat in VARIANTS:
    return _remat_arg(VARIANTS[remat]["remat"])
  return tuple(remat.split("+"))


# -- jlora ------------------------------------------------------------------------


def run_jlora(name: str, s: dict, rank: int, alpha: float, steps: int,
              warmup: int, matmul: bool, profile: bool = False,
              hlo_dir: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import LlamaForCausalLM, ModelConfig

  opts = parse_system(name)
  on_gpu = jax.default_backend() == "gpu"
  scan = bool(opts.get("scan", 1))
  cfg = ModelConfig(
    vocab_size=s["vocab"], hidden_size=s["hidden"],
    intermediate_size=s["inter"], num_layers=s["layers"],
    num_heads=s["heads"], num_kv_heads=s["kv_heads"], rms_norm_eps=1e-5,
    max_position_embeddings=s["seq"])
  offload = tuple(x for x in opts.get("offload", "").split("+") if x)
  attention = opts.get("attention", "cudnn" if on_gpu else "xla")
  model = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, scan,
                           _remat_arg(opts["remat"]), attention, offload)
  tx = optax.adamw(1e-4)
  key = jax.random.key(0)
  ids = jax.random.randint(key, (s["batch"], s["seq"] + 1), 0, s["vocab"])
  inputs, labels = ids[:, :-1], ids[:, 1:]

  fp8 = dict(FP8_BASES[opts.get("base", "bf16")] or {})
  head = fp8.pop("head", False)
  fp8_targets = "|".join(TARGETS + (("lm_head",) if head else ()))
  fp8 = fp8 or None

  def init(key):
    params = model.init(key, inputs[:1, :8])["params"]
    if fp8 is not None:
      params = jlora.quant.quantize_fp8(params, targets=fp8_targets, **fp8)
    return params

  def adapt(params, key):
    lp = jlora.apply(params, rank=rank, alpha=alpha, key=key,
                     targets="|".join(TARGETS))
    trainable, frozen = jlora.partition(lp)
    return trainable, frozen, tx.init(trainable)

  def make(key):
    return adapt(init(key), key)

  step = lora_step(model, tx, opts)

  t0 = time.perf_counter()
  t_shape, frozen_shape, opt_shape = jax.eval_shape(make, key)
  compiled = step.lower(t_shape, opt_shape, frozen_shape, inputs,
                        labels).compile()
  compile_s = time.perf_counter() - t0
  stem = hlo_dir and trace_summary.save_hlo(hlo_dir, name, compiled)
  mem = compiled.memory_analysis()
  footprint = temp = None
  if mem is not None:
    footprint = (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
                 mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30
    temp = mem.temp_size_in_bytes / 2**30

  if fp8 is None:
    trainable, frozen, opt_state = jax.jit(make)(key)
  else:
    params = fp8_params(jax.eval_shape(init, key), key, fp8)
    trainable, frozen, opt_state = jax.jit(adapt, donate_argnums=0)(params,
                                                                    key)
    del params
  (trainable, opt_state), losses, rounds = time_steps(
    compiled, (trainable, opt_state), (frozen, inputs, labels), steps, warmup)
  stats = jax.devices()[0].memory_stats() or {}
  step_s = min(rounds)
  trace = None
  if profile:  # one more step, traced
    trace = trace_summary.profile(lambda: jax.block_until_ready(compiled(
        trainable, opt_state, frozen, inputs, labels)), stem)
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  result = dict(
    system=name, options=opts, step_s=step_s, rounds_s=rounds,
    tokens_per_s=s["batch"] * s["seq"] / step_s,
    peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
    footprint_gib=footprint, temp_gib=temp, compile_s=compile_s,
    loss_first=losses[0], loss_last=losses[-1], trainable=int(n_train))
  if matmul:
    result["matmul_tflops"] = max(ts.matmul_tflops() for _ in range(2))
  if fp8 is not None:
    result.update(fp8_matmul_tflops())
  if trace is not None:
    result["profile"] = trace
  return result


def lora_step(model, tx, opts: dict):
  """The jitted LoRA step of a `jlora.models` model, as a system's options say.

  `step(trainable, opt_state, frozen, inputs, labels) -> (trainable,
  opt_state, loss)`, donating the first two: `jlora.wrap` (sharing A
  products unless share=0), the model's own chunked cross-entropy over
  opts["ce"]-token chunks (full logits when 0), and opts["mb"] micro-batches
  accumulated inside the step.
  """
  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import causal_lm_loss

  forward = jlora.wrap(model.apply, share_inputs=bool(opts.get("share", 1)))
  chunk = opts["ce"]

  def loss_fn(t, frozen, inputs, labels):
    p = jlora.combine(t, frozen)
    if chunk:
      h = forward({"params": p}, inputs, return_hidden=True)
      return causal_lm_loss(model.config, p, h, labels, chunk_size=chunk)
    logp = jax.nn.log_softmax(forward({"params": p}, inputs))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

  micro = opts.get("mb", 1)

  def loss_and_grad(t, frozen, inputs, labels):
    if micro == 1:
      return jax.value_and_grad(loss_fn)(t, frozen, inputs, labels)
    # Gradient accumulation inside the step: the batch in `micro` equal
    # slices, one after another (lax.scan), so only one slice's activations
    # are alive; the mean of equal-sized means is the batch mean.
    xs = jax.tree.map(
      lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]),
      (inputs, labels))

    def body(acc, xy):
      loss, g = jax.value_and_grad(loss_fn)(t, frozen, *xy)
      return jax.tree.map(jnp.add, acc, g), loss

    g, losses = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, t), xs)
    return jnp.mean(losses), jax.tree.map(lambda x: x / micro, g)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(t, opt_state, frozen, inputs, labels):
    loss, g = loss_and_grad(t, frozen, inputs, labels)
    u, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, u), opt_state, loss

  return step


def time_steps(compiled, state: tuple, args: tuple, steps: int, warmup: int):
  """Runs `warmup` steps, then two timed rounds of `steps`.

  `compiled(*state, *args)` returns `(*state, loss)`. Returns the final
  state, every loss, and each round's seconds per step (take the min).
  """
  import jax

  losses = []
  for _ in range(warmup):
    *state, loss = compiled(*state, *args)
    losses.append(float(loss))
  rounds = []
  for _ in range(2):
    t0 = time.perf_counter()
    out = []
    for _ in range(steps):
      *state, loss = compiled(*state, *args)
      out.append(loss)
    jax.block_until_ready((state, out))
    rounds.append((time.perf_counter() - t0) / steps)
    losses += [float(x) for x in out]
  return tuple(state), losses, rounds


def fp8_params(shapes, key, fp8: dict):
  """Random params shaped like `shapes`, made leaf by leaf.

  Kernels and embeddings N(0, 0.02^2), norm scales 1, biases 0; the
  projections' kernels (already `Fp8Array` structs in `shapes`) are drawn in
  bf16 and quantized in the same small program, so no more than one dense
  kernel exists at a time.
  """
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  import jlora

  flat = traverse_util.flatten_dict(shapes, sep="/")  # Fp8Array: a leaf
  out = {}
  for i, (path, struct) in enumerate(sorted(flat.items())):
    stored = jlora.quant.is_fp8(struct)
    dtype = jnp.bfloat16 if stored else struct.dtype

    def leaf(k, path=path, shape=struct.shape, dtype=dtype, stored=stored):
      if path.endswith("scale"):
        return jnp.ones(shape, dtype)
      if path.endswith("bias"):
        return jnp.zeros(shape, dtype)
      x = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
      if stored:
        return jlora.quant.quantize_fp8({"kernel": x}, **fp8)["kernel"]
      return x

    out[path] = jax.jit(leaf)(jax.random.fold_in(key, i))
  return traverse_util.unflatten_dict(out, sep="/")


def fp8_matmul_tflops() -> dict:
  """Rates of an e4m3 x e4m3 -> bf16 product, both operands K-major ("tn",
  what cuBLASLt's FP8 GEMM wants) and the kernel (K, N) row-major ("nn",
  the layout of a Flax kernel, which XLA transposes first)."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  n = 8192 if jax.default_backend() == "gpu" else 512
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(jnp.float8_e4m3fn)
  b = jax.random.normal(jax.random.key(1), (n, n)).astype(jnp.float8_e4m3fn)
  rates = {"fp8_gemm_n": n}
  for name, dims in (("tn", (((1,), (1,)), ((), ()))),
                     ("nn", (((1,), (0,)), ((), ())))):
    f = jax.jit(lambda a, b, dims=dims: lax.dot_general(
      a, b, dims, preferred_element_type=jnp.bfloat16))
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    rates[f"fp8_{name}_tflops"] = 2 * n ** 3 / sorted(times)[5] / 1e12
  return rates


def run_peft_system(name: str, s: dict, rank: int, alpha: float, steps: int,
                    warmup: int) -> dict:
  r = ts.run_peft(name, s, rank, alpha, steps, warmup, False)
  return dict(dataclasses.asdict(r), options={})


# -- driver -----------------------------------------------------------------------


def child(args) -> None:
  s = SHAPES[args.shape]
  if not args.system.startswith("peft"):
    flags = parse_system(args.system).get("flags", "")
    extra = " ".join(XLA_FLAGS[f] for f in flags.split("+") if f)
    if extra:  # before jax is imported
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                                 extra).strip()
  if args.system.startswith("peft"):
    result = run_peft_system(args.system, s, args.rank, args.alpha,
                             args.steps, args.warmup)
  else:
    result = run_jlora(args.system, s, args.rank, args.alpha, args.steps,
                       args.warmup, args.matmul, args.profile, args.hlo_dir)
  print("RESULT " + json.dumps(result), flush=True)


def _row(r: dict, flops: float, tflops: float | None, ref: dict | None) -> str:
  if "error" in r:
    return f"{r['system']:<16} error: {r['error'][:300]}"
  floor = ts.floor_fraction(r, flops, tflops)
  vs = mem = "-"
  if ref is not None and ref is not r:
    r["vs_peft_compile"] = r["tokens_per_s"] / ref["tokens_per_s"]
    vs = f"{r['vs_peft_compile']:.2f}x"
    if ref["peak_gib"]:
      r["peak_vs_peft_compile"] = r["peak_gib"] / ref["peak_gib"]
      mem = f"{r['peak_vs_peft_compile']:.2f}x"
  fp = r.get("footprint_gib")
  fp = f"{fp:.2f}" if fp is not None else "-"
  return (f"{r['system']:<16}{r['step_s']:>9.4f}{r['tokens_per_s']:>11,.0f}"
          f"{r['peak_gib']:>9.2f}{fp:>9}{floor * 100:>8.1f}%{vs:>8}{mem:>8}"
          f"{r['loss_first']:>9.3f}->{r['loss_last']:.3f}")


def report(args, results: list, tflops: float | None) -> dict:
  s = SHAPES[args.shape]
  flops = ts.floor_flops(s)
  ref = next((r for r in results
              if r["system"] == "peft_compile" and "error" not in r), None)
  lines = [
    ts.shape_line(args, flops, tflops),
    f"{'system':<16}{'step s':>9}{'tokens/s':>11}{'peak GiB':>9}"
    f"{'XLA GiB':>9}{'floor':>9}{'vs PEFT':>8}{'mem':>8}{'loss0->N':>18}",
  ]
  lines.append("-" * len(lines[-1]))
  lines += [_row(r, flops, tflops, ref) for r in results]
  fp8 = next((r for r in results if "fp8_tn_tflops" in r), None)
  if fp8 is not None:
    lines.append(f"e4m3 GEMM {fp8['fp8_gemm_n']}^3:"
                 f" {fp8['fp8_tn_tflops']:.0f} TFLOP/s with"
                 f" both operands K-major, {fp8['fp8_nn_tflops']:.0f} with a"
                 " row-major (K, N) kernel")
  for r in results:
    for device, prof in (r.get("profile") or {}).items():
      roles = ", ".join(f"{k} {v:.1f}" for k, v in prof["by_role_ms"].items())
      lines.append(f"{r['system']} GPU ms by kernel: {roles}"
                   f" (busy {prof['compute_ms']:.1f} of {prof['span_ms']:.1f})")
  print("\n".join(lines), flush=True)
  return dict(shape=args.shape, config=s, rank=args.rank, alpha=args.alpha,
              steps=args.steps, warmup=args.warmup, matmul_tflops=tflops,
              floor_tflop=flops / 1e12, results=results,
              table="\n".join(lines))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
  p.add_argument("--systems", default=None,
                 help="comma-separated; default per shape: "
                 + json.dumps(DEFAULT_SYSTEMS))
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--timeout", type=float, default=300,
                 help="seconds per system")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds for the whole run; later systems are skipped")
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--profile", action="store_true",
                 help="trace one more step of each jlora system: GPU time by"
                 " kernel role and the top kernels")
  p.add_argument("--hlo-dir", default=None,
                 help="write each jlora system's compiled HLO here")
  p.add_argument("--system", help=argparse.SUPPRESS)
  p.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.system:
    return child(args)

  start = time.perf_counter()
  systems = (args.systems or DEFAULT_SYSTEMS[args.shape]).split(",")
  for name in systems:
    if not name.startswith("peft"):
      parse_system(name)  # fail early on a bad spec
  results, tflops, measured = [], None, False
  for name in systems:
    left = (args.budget - (time.perf_counter() - start)
            if args.budget else args.timeout)
    if left < 20:
      results.append(dict(system=name, error="skipped: out of time budget"))
      continue
    cmd = [sys.executable, __file__, "--shape", args.shape, "--system", name,
           "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if not name.startswith("peft"):
      cmd += ["--profile"] * args.profile
      cmd += ["--hlo-dir", args.hlo_dir] if args.hlo_dir else []
    if not name.startswith("peft") and not measured:
      cmd.append("--matmul")
      measured = True
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=min(args.timeout, left))
      out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      err = f"timed out after {min(args.timeout, left):.0f} s"
    found = [json.loads(l[7:]) for l in out.splitlines()
             if l.startswith("RESULT ")]
    if found:
      r = found[0]
      tflops = r.pop("matmul_tflops", None) or tflops
    else:
      tail = [l for l in (err or out).strip().splitlines() if l.strip()][-4:]
      r = dict(system=name, error=" | ".join(tail))
    r["wall_s"] = time.perf_counter() - t0
    results.append(r)
    print(f"[{name}] {r['wall_s']:.0f} s"
          + (f" error: {r['error'][:400]}" if "error" in r else
             f" step {r['step_s']:.4f} s peak {r['peak_gib']:.2f} GiB"),
          file=sys.stderr, flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(shape=args.shape, partial=True, results=results,
                       matmul_tflops=tflops), f, indent=1)
  out = report(args, results, tflops)
  ts.emit_json(out, args.json)


if __name__ == "__main__":
  main()
