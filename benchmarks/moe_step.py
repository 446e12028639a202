"""Qwen3-MoE-shaped LoRA training step: jlora vs transformers + PEFT (+ compile).

Each system runs in its own subprocess (its own allocator, so its peak memory
is its own), one after another; then a table and JSON are printed.

  python benchmarks/moe_step.py --shape 30b                     # one H200
  python benchmarks/moe_step.py --shape tiny                    # CPU smoke run
  python benchmarks/moe_step.py --shape 30b --systems \
      "mlp,mlp/mesh=data:2,mlp/mesh=data:2/setmesh=0"           # 2 GPUs
  python benchmarks/moe_step.py --shape 30b --probe mosaic,cudnn,xla
      # the grouped product alone at the expert shapes, per GPU lowering

Shape "30b" is Qwen3-30B-A3B: 48 layers, hidden 2048, 128 experts, top-8
(normalised), expert width 768, 32 heads, 4 KV heads, head_dim 128, vocab
151936; batch 2 x 2048. About 61 GB of bf16 weights: both sides build them on
the GPU with random values (never on the host).

Systems:
  peft            transformers' Qwen3MoeForCausalLM (sdpa attention, its
                  default grouped-GEMM experts) + PEFT LoRA: `target_modules`
                  on q/k/v/o_proj and `target_parameters` on
                  mlp.experts.gate_up_proj and mlp.experts.down_proj (PEFT's
                  ParamWrapper: the merged expert weights W + s * B A are
                  formed on every forward).
  peft_compile    the same under torch.compile.
  peft_gc, peft_compile_gc   the same with gradient checkpointing.
  jlora systems   `jlora.models.CausalLM` with the Qwen3-MoE config (bf16,
                  scan over layers, cuDNN attention on GPU), experts as
                  `lax.ragged_dot` over tokens sorted by expert, LoRA through
                  `jlora.apply` + `jlora.wrap` (experts kept factored); named
                  as in benchmarks/train_speed.py (a preset "matmuls", "mlp",
                  "full", ... or a spec "remat=mlp/ce=1024"), plus
                  "/ragged=..." for how the grouped products run on a GPU:
                    auto    mosaic (default)
                    mosaic  what jlora does: the expert products (and,
                            under `jlora.wrap`, their LoRA factors) through
                            jlora._grouped_gemm (jax's Mosaic GPU grouped
                            GEMM kernels on Hopper)
                  and, with JLORA_GROUPED_GEMM=xla (lax.ragged_dot), XLA's:
                    triton  jax's Pallas-Triton grouped GEMM lowering
                            (jax_ragged_dot_use_gpu_pallas_triton_lowering;
                            the lowering module ships in some jax wheels only)
                    cudnn   XLA's cuDNN ragged-dot fusion
                            (--xla_gpu_experimental_use_ragged_dot_fusion)
                    xla     XLA's default: each group expanded to dense
                            (E = 128 times the expert FLOPs and memory)
                  Each jlora result records which kernels its compiled HLO
                  holds ("hlo"), so a lowering that did not engage shows.
                  "/mesh=data:2" runs data parallel over 2 devices (params
                  replicated, `batch` rows per device, tokens/s global),
                  tracing under `jax.set_mesh` so that each device routes its
                  own tokens; "/setmesh=0" traces without it (one routing
                  over the global batch: the behaviour before per-device
                  routing).

Same step for all: batch x seq random tokens, next-token cross-entropy, AdamW
(lr 1e-4), LoRA r=16 alpha=32 on q, k, v, o and both expert projections of
every expert; the router frozen, no auxiliary loss. Peak memory: the
allocator's peak (`peak_bytes_in_use`; PyTorch's `max_memory_allocated`).
FLOP floor: 4 x the matmul parameters a token uses (attention projections,
router, its top-k experts' projections, the head) x tokens, plus attention's
two products (non-causal), as in benchmarks/train_step.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_speed  # noqa: E402  (system specs)
import train_step as ts  # noqa: E402  (run_systems, emit_json, ...)

SHAPES = {
  # Qwen/Qwen3-30B-A3B.
  "30b": dict(hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128,
              experts=128, top_k=8, expert_inter=768, vocab=151936,
              batch=2, seq=2048),
  "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
               experts=8, top_k=2, expert_inter=32, vocab=512, batch=2,
               seq=64),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("gate_up_proj", "down_proj")
JLORA_TARGETS = (r"self_attn/(q|k|v|o)_proj/kernel|"
                 r"mlp/experts/(gate_up|down)_proj/kernel")
DEFAULT_SYSTEMS = {
  # Without gradient checkpointing PEFT runs out of memory on an H200.
  "30b": "full,matmuls,peft_gc,peft_compile_gc",
  "tiny": "peft_compile,peft,matmuls,full,full/ragged=xla",
}
RAGGED = ("auto", "mosaic", "triton", "cudnn", "xla")
_TRITON_MODULE = "jax._src.lax.pallas_lowerings.gpu.ragged_dot"
_CUDNN_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"


def hf_config(s: dict):
  from transformers import Qwen3MoeConfig

  return Qwen3MoeConfig(
    hidden_size=s["hidden"], intermediate_size=6144,  # dense layers: none
    moe_intermediate_size=s["expert_inter"], num_hidden_layers=s["layers"],
    num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
    head_dim=s["head_dim"], vocab_size=s["vocab"],
    num_experts=s["experts"], num_experts_per_tok=s["top_k"],
    norm_topk_prob=True, max_position_embeddings=max(4096, s["seq"]),
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    pad_token_id=None, bos_token_id=None, eos_token_id=None,
    attn_implementation="sdpa")


def active_matmul_params(s: dict) -> int:
  """Matmul weights one token uses: projections, router, k experts, head."""
  h = s["hidden"]
  attn = h * s["head_dim"] * (2 * s["heads"] + 2 * s["kv_heads"])
  experts = s["top_k"] * 3 * h * s["expert_inter"]
  return s["layers"] * (attn + h * s["experts"] + experts) + s["vocab"] * h


def floor_flops(s: dict) -> float:
  """Forward + input gradient of every active matmul, plus attention's two
  products (non-causal), forward and backward."""
  tokens = s["batch"] * s["seq"]
  attention = (12 * s["batch"] * s["seq"] ** 2 * s["heads"] * s["head_dim"]
               * s["layers"])
  return 4 * active_matmul_params(s) * tokens + attention


def parse_system(name: str) -> dict:
  """A train_speed system spec plus this benchmark's "ragged=...",
  "mesh=..." and "setmesh=..." parts."""
  own = ("ragged=", "mesh=", "setmesh=")
  parts = name.split("/")
  extra = {p.partition("=")[0]: p.partition("=")[2] for p in parts
           if p.startswith(own)}
  rest = "/".join(p for p in parts if not p.startswith(own))
  opts = train_speed.parse_system(rest)
  opts["ragged"] = extra.get("ragged", "auto")
  if "mesh" in extra:
    opts["mesh"] = extra["mesh"]
    opts["setmesh"] = int(extra.get("setmesh", "1"))
  if opts["ragged"] not in RAGGED:
    raise SystemExit(f"ragged={opts['ragged']!r}; choose one of {RAGGED}")
  return opts


def _triton_available() -> bool:
  try:
    return importlib.util.find_spec(_TRITON_MODULE) is not None
  except ModuleNotFoundError:
    return False


def ragged_lowering(opts: dict) -> str:
  """Sets up the ragged_dot lowering of `opts`; call before importing jax
  (XLA_FLAGS are read when the backend starts). Returns the one used."""
  choice = opts["ragged"]
  if choice in ("auto", "mosaic"):
    return "mosaic"
  os.environ["JLORA_GROUPED_GEMM"] = "xla"
  if choice == "triton" and not _triton_available():
    raise SystemExit(f"ragged=triton: this jax has no {_TRITON_MODULE}")
  if choice == "cudnn":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + _CUDNN_FLAG).strip()
  return choice


def hlo_kernels(text: str) -> dict:
  """How the compiled step runs its grouped GEMMs (counts in the HLO)."""
  return {
    "ragged_dot_ops": text.count("ragged-dot("),
    "triton_ragged": text.count("pallas_triton_ragged_dot")
                     + text.count("tgmm_ragged_dot"),
    "cudnn_fusions": text.count("__cudnn$fusion"),
    "mosaic_kernels": text.count("mosaic_gpu"),
  }


# -- jlora --------------------------------------------------------------------------


def random_params(model, key, sample):
  """The model's params drawn on the device leaf by leaf (norms 1, the rest
  N(0, 0.02^2)); stacked leaves layer by layer, so a leaf's temporaries stay
  at one layer's size."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  shapes = jax.eval_shape(lambda k: model.init(k, sample)["params"], key)
  flat = traverse_util.flatten_dict(shapes, sep="/")

  @functools.partial(jax.jit, static_argnums=(1, 2, 3))
  def draw(k, shape, dtype, ones):
    def one(k):
      if ones:
        return jnp.ones(shape[1:], dtype)
      return (0.02 * jax.random.normal(k, shape[1:], jnp.float32)).astype(
        dtype)
    return jax.lax.map(one, jax.random.split(k, shape[0]))

  out = {}
  for i, (path, s) in enumerate(sorted(flat.items())):
    shape = s.shape if len(s.shape) > 1 else (1, *s.shape)
    x = draw(jax.random.fold_in(key, i), shape, s.dtype,
             path.endswith("/scale"))
    out[path] = x.reshape(s.shape)
  return traverse_util.unflatten_dict(out, sep="/")


def run_jlora(name: str, s: dict, rank: int, alpha: float, steps: int,
              warmup: int) -> dict:
  opts = parse_system(name)
  lowering = ragged_lowering(opts)  # before jax starts

  import jax
  import jax.numpy as jnp
  import optax

  import jlora
  from jlora.models import CausalLM, ModelConfig

  on_gpu = jax.default_backend() == "gpu"
  if lowering == "triton":
    jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
  cfg = ModelConfig.from_hf(hf_config(s))
  model = CausalLM(cfg, jnp.bfloat16, jnp.bfloat16,
                   bool(opts.get("scan", 1)),
                   train_speed._remat_arg(opts["remat"]),
                   opts.get("attention", "cudnn" if on_gpu else "xla"),
                   tuple(x for x in opts.get("offload", "").split("+") if x))
  tx = optax.adamw(1e-4)
  key = jax.random.key(0)
  mesh = None
  rows = s["batch"]
  if "mesh" in opts:  # data parallel: the batch per device, params replicated
    from jlora.models import sharding
    mesh = sharding.make_mesh(opts["mesh"])
    rows *= mesh.size
  ids = jax.random.randint(key, (rows, s["seq"] + 1), 0, s["vocab"])
  inputs, labels = ids[:, :-1], ids[:, 1:]

  def log(msg):
    print(f"[{name}] {time.perf_counter() - start:7.1f} s  {msg}",
          file=sys.stderr, flush=True)

  start = t0 = time.perf_counter()
  params = random_params(model, key, inputs[:1, :8])
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    params = jax.device_put(params, NamedSharding(mesh, P()))
    inputs, labels = (jax.device_put(
        a, NamedSharding(mesh, sharding.batch_spec(mesh))) for a in
        (inputs, labels))
  log("params drawn")
  lp = jlora.apply(params, rank=rank, alpha=alpha, key=key,
                   targets=JLORA_TARGETS)
  del params
  trainable, frozen = jlora.partition(lp)
  del lp
  opt_state = jax.jit(tx.init)(trainable)
  jax.block_until_ready((trainable, frozen, opt_state))
  init_s = time.perf_counter() - t0
  log("adapters and optimizer state made")

  step = train_speed.lora_step(model, tx, opts)

  t0 = time.perf_counter()
  if mesh is not None and opts["setmesh"]:
    # MoE blocks route each device's own tokens (jlora.models._moe).
    with jax.set_mesh(mesh):
      lowered = step.lower(trainable, opt_state, frozen, inputs, labels)
  else:
    lowered = step.lower(trainable, opt_state, frozen, inputs, labels)
  log("traced and lowered")
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  hlo = hlo_kernels(compiled.as_text())
  mem = compiled.memory_analysis()
  temp = None if mem is None else mem.temp_size_in_bytes / 2**30
  log(f"compiled: temp {temp} GiB, {hlo}")
  (trainable, opt_state), losses, rounds = train_speed.time_steps(
    compiled, (trainable, opt_state), (frozen, inputs, labels), steps, warmup)
  stats = jax.devices()[0].memory_stats() or {}
  step_s = min(rounds)
  return dict(
    system=name, options=opts, ragged=lowering, hlo=hlo, step_s=step_s,
    rounds_s=rounds, tokens_per_s=rows * s["seq"] / step_s,
    devices=1 if mesh is None else mesh.size,
    peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30, temp_gib=temp,
    init_s=init_s, compile_s=compile_s, loss_first=losses[0],
    loss_last=losses[-1],
    trainable=int(sum(x.size for x in jax.tree.leaves(trainable))))


# -- PyTorch / PEFT ------------------------------------------------------------------


def run_peft(name: str, s: dict, rank: int, alpha: float, steps: int,
             warmup: int) -> dict:

  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import Qwen3MoeForCausalLM

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  t0 = time.perf_counter()
  # Built on the device in bf16, adapters too: the 61 GB model never
  # touches the host.
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  with torch.device(device):
    model = Qwen3MoeForCausalLM(hf_config(s))
  torch.set_default_dtype(default)
  if name.endswith("_gc"):
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
  config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTENTION),
                      target_parameters=[f"mlp.experts.{p}" for p in EXPERTS])
  with torch.device(device):
    model = get_peft_model(model, config)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4)
  if device == "cuda":
    torch.cuda.synchronize()
  init_s = time.perf_counter() - t0
  ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)
  inputs, labels = ids[:, :-1], ids[:, 1:]

  losses, step_s, peak = ts.torch_steps(
    model, opt, inputs, labels, device, warmup, steps,
    compile_=name.startswith("peft_compile"))
  return dict(system=name, options={}, step_s=step_s,
              tokens_per_s=s["batch"] * s["seq"] / step_s, peak_gib=peak,
              init_s=init_s, loss_first=losses[0], loss_last=losses[-1],
              trainable=sum(p.numel() for p in trainable),
              experts_implementation=getattr(
                model.config, "_experts_implementation", None))


# -- ragged_dot probe -----------------------------------------------------------------


def run_probe(lowering: str, s: dict, rank: int, reps: int = 5) -> dict:
  """Times the grouped product at the expert shapes under one lowering:
  forward, input gradient and weight gradient, for the (hidden -> 2 inner)
  base product and for a LoRA factor (hidden -> rank)."""
  lowering = ragged_lowering({"ragged": lowering})
  import jax
  import jax.numpy as jnp

  from jlora import _grouped_gemm

  # "mosaic" is lax.ragged_dot where jlora's kernels do not apply.
  ragged_dot = (_grouped_gemm.ragged_dot if lowering == "mosaic"
                else jax.lax.ragged_dot)

  if lowering == "triton":
    jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
  e = s["experts"]
  m = s["batch"] * s["seq"] * s["top_k"]
  key = jax.random.key(0)
  ids = jax.random.randint(key, (m,), 0, e)
  sizes = jnp.bincount(ids, length=e).astype(jnp.int32)
  out = {"lowering": lowering, "rows": m}
  for label, (k, n) in {"base": (s["hidden"], 2 * s["expert_inter"]),
                        "factor": (s["hidden"], rank)}.items():
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    w = jax.random.normal(key, (e, k, n), jnp.bfloat16)
    dy = jax.random.normal(key, (m, n), jnp.bfloat16)
    fns = {
      "fwd": lambda x, w: ragged_dot(x, w, sizes),
      "dgrad": lambda x, w: jax.vjp(
        lambda x: ragged_dot(x, w, sizes), x)[1](dy)[0],
      "wgrad": lambda x, w: jax.vjp(
        lambda w: ragged_dot(x, w, sizes), w)[1](dy)[0],
    }
    for leg, fn in fns.items():
      compiled = jax.jit(fn).lower(x, w).compile()
      compiled(x, w).block_until_ready()
      t0 = time.perf_counter()
      for _ in range(reps):
        y = compiled(x, w)
      y.block_until_ready()
      ms = (time.perf_counter() - t0) / reps * 1e3
      mem = compiled.memory_analysis()
      out[f"{label}_{leg}"] = dict(
        ms=ms, tflops=2 * m * k * n / (ms * 1e-3) / 1e12,
        temp_gib=None if mem is None else mem.temp_size_in_bytes / 2**30,
        hlo=hlo_kernels(compiled.as_text()))
  return out


def probe(args) -> None:
  rows = []
  for lowering in args.probe.split(","):
    cmd = [sys.executable, __file__, "--shape", args.shape, "--rank",
           str(args.rank), "--probe-one", lowering]
    import subprocess
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=args.timeout)
      found = [json.loads(l[6:]) for l in proc.stdout.splitlines()
               if l.startswith("PROBE ")]
      err = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
      found, err = [], [f"timed out after {args.timeout} s"]
    rows.append(found[0] if found else dict(lowering=lowering,
                                            error=" | ".join(err)))
  for r in rows:
    if "error" in r:
      print(f"{r['lowering']:<8} error: {r['error'][:300]}")
      continue
    for key in sorted(k for k in r if k.endswith(("fwd", "dgrad", "wgrad"))):
      v = r[key]
      print(f"{r['lowering']:<8}{key:<14}{v['ms']:>10.3f} ms"
            f"{v['tflops']:>9.1f} TFLOP/s  temp {v['temp_gib'] or 0:.2f} GiB"
            f"  {v['hlo']}")
  ts.emit_json(dict(shape=args.shape, probe=rows), args.json)


# -- driver ------------------------------------------------------------------------


def child(args) -> None:
  s = SHAPES[args.shape]
  runner = run_peft if args.system.startswith("peft") else run_jlora
  result = runner(args.system, s, args.rank, args.alpha, args.steps,
                  args.warmup)
  print("RESULT " + json.dumps(result), flush=True)
  if args.matmul:
    print("MATMUL " + json.dumps({"tflops": ts.matmul_tflops()}), flush=True)


def report(args, results: list, tflops: float | None) -> dict:
  s = SHAPES[args.shape]
  flops = floor_flops(s)
  ok = [r for r in results if "error" not in r]
  peft = [r for r in ok if r["system"].startswith("peft")]
  ref = max(peft, key=lambda r: r["tokens_per_s"], default=None)
  lines = [
    (f"shape {args.shape}: {s}; LoRA r={args.rank} alpha={args.alpha}; "
     f"{active_matmul_params(s) / 1e9:.2f}B active matmul params; bf16 "
     f"matmul {tflops or 0:.0f} TFLOP/s; floor {flops / 1e12:.1f} "
     "TFLOP/step"),
    (f"{'system':<24}{'step s':>9}{'tokens/s':>11}{'peak GiB':>9}"
     f"{'floor':>8}{'vs PEFT':>9}{'mem':>7}{'loss0->N':>18}  notes"),
  ]
  lines.append("-" * len(lines[-1]))
  for r in results:
    if "error" in r:
      lines.append(f"{r['system']:<24} error: {r['error'][:300]}")
      continue
    floor = ts.floor_fraction(r, flops, tflops)
    vs = mem = "-"
    if ref is not None and r is not ref and not r["system"].startswith(
        "peft"):
      r["vs_best_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
      vs = f"{r['vs_best_peft']:.2f}x"
      if ref["peak_gib"]:
        r["peak_vs_best_peft"] = r["peak_gib"] / ref["peak_gib"]
        mem = f"{r['peak_vs_best_peft']:.2f}x"
    notes = (f"ragged={r['ragged']} hlo={r['hlo']}" if "ragged" in r
             else f"experts={r.get('experts_implementation')}")
    lines.append(
      f"{r['system']:<24}{r['step_s']:>9.4f}{r['tokens_per_s']:>11,.0f}"
      f"{r['peak_gib']:>9.2f}{floor * 100:>7.1f}%{vs:>9}{mem:>7}"
      f"{r['loss_first']:>9.3f}->{r['loss_last']:.3f}  {notes}")
  if ref is not None:
    lines.append(f"vs PEFT / mem: against the faster PEFT system "
                 f"({ref['system']})")
  print("\n".join(lines), flush=True)
  return dict(shape=args.shape, config=s, rank=args.rank, alpha=args.alpha,
              steps=args.steps, warmup=args.warmup, matmul_tflops=tflops,
              active_matmul_params=active_matmul_params(s),
              floor_tflop=flops / 1e12, results=results,
              table="\n".join(lines))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="30b")
  p.add_argument("--systems", default=None,
                 help="comma-separated; default per shape: "
                 + json.dumps(DEFAULT_SYSTEMS))
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout", type=float, default=540,
                 help="seconds per system")
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--probe", default=None, metavar="LOWERINGS",
                 help="instead of training steps, time the grouped product at the"
                 " expert shapes under these comma-separated lowerings (from"
                 f" {RAGGED}), each in its own process")
  p.add_argument("--system", help=argparse.SUPPRESS)
  p.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--probe-one", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.probe_one:
    result = run_probe(args.probe_one, SHAPES[args.shape], args.rank)
    print("PROBE " + json.dumps(result), flush=True)
    return None
  if args.probe:
    return probe(args)
  if args.system:
    return child(args)

  systems = (args.systems or DEFAULT_SYSTEMS[args.shape]).split(",")
  for name in systems:
    if not name.startswith("peft"):
      parse_system(name)  # fail early on a bad spec
  # The matmul rate is measured by the first system's process.
  results, tflops = ts.run_systems(__file__, systems, ts.common_flags(args),
                                   args.timeout)
  ts.emit_json(report(args, results, tflops), args.json)


if __name__ == "__main__":
  main()
