"""Scaling jlora.models training: data parallel and FSDP over GPUs, 70B models.

Every row is the product path (`jlora.models.from_config` with
`scan_layers=True`, bf16, cuDNN attention on GPU, `jlora.apply` r=16 alpha 32
on the seven projections, `jlora.wrap`, `causal_lm_loss`, AdamW), measured in
its own subprocess under its own timeout. Rows that need more devices than
exist are skipped with the reason printed.

  python benchmarks/scale.py                               # every row that fits
  python benchmarks/scale.py --rows 8b_1,70b_qlora --json out.json
  python benchmarks/scale.py --tiny --cpu-devices 8        # CPU smoke run
  python benchmarks/scale.py --rows 70b_qlora_fast --profile  # copy overlap

Rows:
  8b_1          Llama-3-8B shape, batch 2 x 2048, one GPU (data = fsdp here)
  8b_data2      the same per GPU, data parallel over 2 GPUs (batch 4 x 2048)
  8b_fsdp2      the same, FSDP over 2 GPUs (params and adapters sharded)
  70b_qlora     Llama-3-70B shape, NF4 + double quantization made layer by
                layer (`from_config(quantize="nf4")`), batch 1 x 4096, one
                GPU; remat "full" with each layer's input offloaded to
                pinned host memory (residuals: 5 GiB that the device cannot
                spare under 44 GiB), chunked cross-entropy
  70b_qlora_fast  the same with the gate/up outputs offloaded too, so the
                backward pass recomputes only the attention block (0.47 s
                less matmul work per step), under XLA's latency-hiding
                scheduler; pays only if the 40 GiB of host copies each way
                overlap with compute
  70b_qlora_matmuls  remat "matmuls" on the device, nothing offloaded: no
                matmul recomputed (the speed ceiling), about 90 GiB
  70b_qlora_hostopt  70b_qlora with AdamW's state in pinned host memory
                (1.5 GiB less on the device)
  70b_qlora_long  the longest context at batch 1: candidate lengths
                (64k, 96k, 128k) are first compiled only (XLA's memory
                analysis against the device's and the host's memory,
                bisected), then one step runs at the longest that fits, up to
                64k (a 128k step is minutes of attention)
  70b_fsdp2     70B in bf16, FSDP over 2 GPUs, batch 1 x 4096 per GPU
  70b_peft_bnb  transformers + PEFT + bitsandbytes NF4 (double quant) at the
                70B QLoRA shape, built on the meta device and quantized layer
                by layer, gradient checkpointing; skipped when bitsandbytes
                cannot be imported ($JLORA_BNB or ./.whl as in qlora_step.py)

Columns: GPUs, strategy, tokens/s (global), peak GiB per GPU (the allocator's
peak over the whole process, loading included; PyTorch's after loading),
and the fraction of the FLOP floor (`train_step.floor_flops`: 4 x params x
tokens + non-causal attention) at 790 TFLOP/s per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import train_step as ts  # noqa: E402  (floor_flops, TARGETS, emit_json)

FLOOR_TFLOPS = 790.0
SHAPES = {
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8,
               vocab=128256),
    "70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8,
                vocab=128256),
}
# --tiny: the same rows at CPU sizes (8 simulated devices for the meshes).
TINY_SHAPES = {
    "8b": dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2,
               vocab=256),
    "70b": dict(hidden=128, inter=384, layers=3, heads=8, kv_heads=1,
                vocab=256),
}
OFFLOAD_FAST = "decoder_input+gate_proj+up_proj"
LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"


@dataclasses.dataclass
class Row:
  shape: str
  gpus: int
  strategy: str
  batch: int  # rows per GPU
  seq: int
  mesh: str | None = None  # None: one device, no mesh
  quantize: str | None = None
  remat: str = "full"
  offload: str = ""
  ce: int = 1024  # chunked cross-entropy tokens per chunk
  opt: str = "device"  # "host": AdamW state in pinned host memory
  system: str = "jlora"  # or "peft_bnb"
  contexts: tuple[int, ...] = ()  # >1: probe these lengths, run the longest
  run_at: int = 0  # with contexts: time no longer than this (0: no cap)
  steps: int = 5
  warmup: int = 2
  timeout: float = 540.0
  baseline: str | None = None  # the 1-GPU row this one scales from
  flags: str = ""  # XLA_FLAGS added for this row's process


ROWS = {
    "8b_1": Row("8b", 1, "1 GPU (data = fsdp)", 2, 2048, remat="matmuls",
                steps=10, warmup=3),
    "8b_data2": Row("8b", 2, "data parallel", 2, 2048, mesh="data:2",
                    remat="matmuls", steps=10, warmup=3, baseline="8b_1"),
    "8b_fsdp2": Row("8b", 2, "FSDP", 2, 2048, mesh="fsdp:2", remat="matmuls",
                    steps=10, warmup=3, baseline="8b_1"),
    "70b_qlora": Row("70b", 1, "QLoRA NF4, full remat, inputs to host", 1,
                     4096, quantize="nf4", offload="decoder_input", steps=4,
                     warmup=1),
    "70b_qlora_fast": Row("70b", 1, "QLoRA NF4, inputs+gate+up to host", 1,
                          4096, quantize="nf4", offload=OFFLOAD_FAST,
                          steps=4, warmup=1, flags=LHS),
    "70b_qlora_matmuls": Row("70b", 1, "QLoRA NF4, remat matmuls", 1, 4096,
                             quantize="nf4", remat="matmuls", steps=4,
                             warmup=1),
    "70b_qlora_hostopt": Row("70b", 1, "QLoRA NF4, inputs+AdamW to host", 1,
                             4096, quantize="nf4", offload="decoder_input",
                             opt="host", steps=4, warmup=1),
    "70b_qlora_long": Row("70b", 1, "QLoRA NF4, longest context", 1, 0,
                          quantize="nf4", offload="decoder_input",
                          contexts=(65536, 98304, 131072), run_at=65536,
                          steps=1, warmup=0),
    "70b_fsdp2": Row("70b", 2, "bf16 FSDP", 1, 4096, mesh="fsdp:2",
                     remat="mlp", steps=4, warmup=1),
    "70b_peft_bnb": Row("70b", 1, "PEFT + bitsandbytes NF4", 1, 4096,
                        system="peft_bnb", steps=2, warmup=1),
}
DEFAULT_ROWS = ("8b_1", "8b_data2", "8b_fsdp2", "70b_qlora", "70b_qlora_fast",
                "70b_qlora_long", "70b_fsdp2", "70b_peft_bnb")


def shape_of(row: Row, tiny: bool) -> dict:
  return dict((TINY_SHAPES if tiny else SHAPES)[row.shape])


def floor(shape: dict, tokens: int, seq: int) -> float:
  """FLOPs of the step's floor (`train_step.floor_flops` for these tokens)."""
  return ts.floor_flops(dict(shape, batch=tokens // seq, seq=seq))


# -- jlora rows ----------------------------------------------------------------

def _config(shape: dict, seq: int):
  from jlora.models import ModelConfig, RopeConfig
  return ModelConfig(
      vocab_size=shape["vocab"], hidden_size=shape["hidden"],
      intermediate_size=shape["inter"], num_layers=shape["layers"],
      num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
      rms_norm_eps=1e-5, max_position_embeddings=max(seq, 8192),
      rope=RopeConfig(theta=500000.0))


def _peak_gib() -> float:
  import jax
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0)
           for d in jax.local_devices()]
  return max(peaks) / 2**30


def _footprint(compiled) -> dict:
  """XLA's static memory of a compiled step, device and host, in GiB."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  g = 2**30
  out = dict(
      xla_gib=(m.argument_size_in_bytes + m.temp_size_in_bytes +
               m.output_size_in_bytes - m.alias_size_in_bytes) / g,
      xla_temp_gib=m.temp_size_in_bytes / g)
  host = getattr(m, "host_temp_size_in_bytes", None)
  if host is not None:
    out["xla_host_temp_gib"] = host / g
  return out


class Step:
  """The jitted train step of one row, with its model and optimizer."""

  def __init__(self, row: Row, shape: dict, seq: int, on_gpu: bool):
    import jax
    import jax.numpy as jnp
    import optax

    import jlora
    from jlora.models import CausalLM
    from jlora.models.decoder import REMAT_POLICIES
    from jlora.models.losses import causal_lm_loss

    self.cfg = cfg = _config(shape, seq)
    remat = row.remat if row.remat in REMAT_POLICIES else tuple(
        row.remat.split("+"))
    offload = tuple(x for x in row.offload.split("+") if x)
    attention = "cudnn" if on_gpu else "xla"
    self.model = CausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True, remat,
                          attention, offload)
    tx = optax.adamw(1e-4)
    self.tx = jlora.quant.host_offloaded(tx) if row.opt == "host" else tx
    forward = jlora.wrap(self.model.apply)
    ce = min(row.ce, row.batch * seq)

    def loss_fn(t, frozen, x, y):
      p = jlora.combine(t, frozen)
      h = forward({"params": p}, x, return_hidden=True)
      return causal_lm_loss(cfg, p, h, y, chunk_size=ce)

    def step(t, opt_state, frozen, x, y):
      loss, g = jax.value_and_grad(loss_fn)(t, frozen, x, y)
      u, opt_state = self.tx.update(g, opt_state, t)
      return optax.apply_updates(t, u), opt_state, loss

    self.step = jax.jit(step, donate_argnums=(0, 1))

  def adapt(self, params, key):
    import jlora
    lp = jlora.apply(params, rank=16, alpha=32.0, key=key,
                     targets="|".join(ts.TARGETS))
    trainable, frozen = jlora.partition(lp)
    return trainable, frozen, self.tx.init(trainable)

  def abstract(self, quantize: str | None):
    """ShapeDtypeStructs of (trainable, opt_state, frozen), nothing made."""
    import jax
    import jax.numpy as jnp

    import jlora

    def make(key):
      params = self.model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
      if quantize:
        params = jlora.quantize(params, quantize)
      t, f, o = self.adapt(params, key)
      return t, o, f

    return jax.eval_shape(make, jax.random.key(0))


def _batch(shape, rows, seq, mesh):
  import jax.numpy as jnp
  import numpy as np
  ids = np.random.default_rng(0).integers(0, shape["vocab"], (rows, seq + 1),
                                          dtype=np.int32)
  x, y = ids[:, :-1], ids[:, 1:]
  if mesh is None:
    return jnp.asarray(x), jnp.asarray(y)
  from jlora.models import sharding
  return sharding.global_batch(x, mesh), sharding.global_batch(y, mesh)


def offloaded_bytes(row: Row, shape: dict, seq: int) -> int:
  """Bytes of pinned host memory the row's offloaded residuals take."""
  h, i = shape["hidden"], shape["inter"]
  kv = shape["kv_heads"] * h // shape["heads"]
  width = {"decoder_input": h, "q_proj": h, "attention": h, "o_proj": h,
           "k_proj": kv, "v_proj": kv, "gate_proj": i, "up_proj": i,
           "down_proj": h}
  names = [n for n in row.offload.split("+") if n]
  return shape["layers"] * row.batch * seq * 2 * sum(width[n] for n in names)


def probe_contexts(row: Row, shape: dict, on_gpu: bool, limit: float | None,
                   log) -> tuple[int | None, list]:
  """The longest of `row.contexts` whose step XLA says fits, bisected.

  Only compiles (abstract arguments, nothing allocated): the device footprint
  (arguments + temporaries) must stay under 97% of `limit` and the host
  temporaries (offloaded residuals) under `train_step.host_limit()`.
  """
  import jax
  contexts = sorted(row.contexts)
  lo, hi, best, probes = 0, len(contexts) - 1, None, []
  host = ts.host_limit()
  while lo <= hi:
    mid = (lo + hi) // 2
    seq = contexts[mid]
    t0 = time.perf_counter()
    step = Step(row, shape, seq, on_gpu)
    t, o, f = step.abstract(row.quantize)
    x = jax.ShapeDtypeStruct((row.batch, seq), "int32")
    try:
      fp = _footprint(step.step.lower(t, o, f, x, x).compile())
      fp["offloaded_gib"] = offloaded_bytes(row, shape, seq) / 2**30
      device_ok = limit is None or fp.get("xla_gib", 0) * 2**30 < 0.97 * limit
      host_need = max(fp.get("xla_host_temp_gib", 0), fp["offloaded_gib"])
      host_ok = host is None or host_need * 2**30 < host
      fits = device_ok and host_ok
    except Exception as e:  # noqa: BLE001  (compile-time OOM and the like)
      fp, fits = {"error": str(e)[:200]}, False
    probes.append(dict(seq=seq, fits=fits, compile_s=time.perf_counter() - t0,
                       **fp))
    log(f"probe {seq}: {'fits' if fits else 'does not fit'} {fp}")
    if fits:
      best, lo = seq, mid + 1
    else:
      hi = mid - 1
  return best, probes


def run_jlora(row: Row, tiny: bool, limit_gib: float | None,
              profile: bool = False, trace_dir: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp

  from jlora import models
  from jlora.models import sharding

  def log(msg):
    print(f"[{row.strategy}] {msg}", file=sys.stderr, flush=True)

  on_gpu = jax.default_backend() == "gpu"
  shape = shape_of(row, tiny)
  seq = row.seq
  out = dict(shape=row.shape, config=shape, devices=jax.device_count(),
             device_kind=jax.devices()[0].device_kind)
  if tiny:
    seq = seq and 64
  if row.contexts:
    contexts = tuple(c // 1024 for c in row.contexts) if tiny else row.contexts
    row = dataclasses.replace(row, contexts=contexts)
    stats = jax.devices()[0].memory_stats() or {}
    limit = (limit_gib * 2**30 if limit_gib else
             stats.get("bytes_limit"))
    seq, probes = probe_contexts(row, shape, on_gpu, limit, log)
    out.update(probes=probes, limit_gib=(limit or 0) / 2**30)
    if seq is None:
      return dict(out, error=f"no context in {row.contexts} fits")
    out["max_seq"] = seq
    if row.run_at:
      seq = min(seq, row.run_at // 1024 if tiny else row.run_at)
  mesh = (sharding.make_mesh(row.mesh, jax.devices()[:row.gpus])
          if row.mesh else None)
  rows = row.batch * (mesh.size if mesh is not None else 1)
  step = Step(row, shape, seq, on_gpu)
  key = jax.random.key(0)

  t0 = time.perf_counter()
  _, params = models.from_config(
      step.cfg, key, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
      scan_layers=True, quantize=row.quantize,
      shardings=None if mesh is None else sharding.param_rule(mesh))
  jax.block_until_ready(params)
  out.update(load_s=time.perf_counter() - t0, load_peak_gib=_peak_gib(),
             base_gib=sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30)
  log(f"made in {out['load_s']:.0f} s, base {out['base_gib']:.2f} GiB,"
      f" peak {out['load_peak_gib']:.2f} GiB")
  trainable, frozen, opt_state = step.adapt(params, jax.random.key(1))
  del params
  x, y = _batch(shape, rows, seq, mesh)

  t0 = time.perf_counter()
  compiled = step.step.lower(trainable, opt_state, frozen, x, y).compile()
  out.update(compile_s=time.perf_counter() - t0, **_footprint(compiled))
  log(f"compiled in {out['compile_s']:.0f} s {_footprint(compiled)}")
  losses = []
  for _ in range(row.warmup):
    trainable, opt_state, loss = compiled(trainable, opt_state, frozen, x, y)
    losses.append(float(loss))
  t0 = time.perf_counter()
  timed = []
  for _ in range(row.steps):
    trainable, opt_state, loss = compiled(trainable, opt_state, frozen, x, y)
    timed.append(loss)
  jax.block_until_ready((trainable, opt_state, timed))
  step_s = (time.perf_counter() - t0) / row.steps
  losses += [float(v) for v in timed]
  if profile:
    import trace_summary

    def one_step():
      jax.block_until_ready(compiled(trainable, opt_state, frozen, x, y))

    stem = trace_dir and trace_summary.save_hlo(trace_dir, row.strategy,
                                                compiled)
    out["profile"] = trace_summary.profile(one_step, stem)
    log(f"profile {out['profile']}")
  tokens = rows * seq
  return dict(out, seq=seq, batch=rows, tokens=tokens, step_s=step_s,
              tokens_per_s=tokens / step_s, peak_gib=_peak_gib(),
              loss_first=losses[0], loss_last=losses[-1],
              trainable=int(sum(v.size for v in jax.tree.leaves(trainable))),
              floor_tflop=floor(shape, tokens, seq) / 1e12)


# -- PEFT + bitsandbytes ---------------------------------------------------------

def build_llama_layerwise(cfg, device: str, make_linear):
  """transformers' LlamaForCausalLM built on the meta device, then made on
  `device` one module at a time: every decoder nn.Linear becomes
  `make_linear(in, out, weight)` (weight: a random bf16 (out, in) tensor on
  `device`, freed after), everything else random bf16 (norms 1), so the
  dense model never exists whole (70B in bf16 would not fit one GPU)."""
  import torch
  from transformers import LlamaForCausalLM

  with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
  std = cfg.initializer_range
  for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, child in list(parent.named_children()):
        if isinstance(child, torch.nn.Linear):
          w = torch.randn(child.out_features, child.in_features,
                          dtype=torch.bfloat16, device=device) * std
          setattr(parent, name, make_linear(child, w))
          del w
  for module in model.modules():
    for name, p in list(module.named_parameters(recurse=False)):
      if p.is_meta:
        value = (torch.ones if p.ndim == 1 else torch.randn)(
            p.shape, dtype=torch.bfloat16, device=device)
        if p.ndim > 1:
          value *= std
        setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
  # Buffers computed at construction (rope frequencies): made again there.
  rotary = type(model.model.rotary_emb)
  with torch.device(device):
    model.model.rotary_emb = rotary(cfg)
  if cfg.tie_word_embeddings:
    model.tie_weights()
  return model


def run_peft_bnb(row: Row, tiny: bool) -> dict:
  try:
    from qlora_step import _import_bnb
    bnb = _import_bnb()
  except Exception as e:  # noqa: BLE001  (not installed, no CUDA build, ...)
    return dict(skipped=f"bitsandbytes not importable: {e!s}"[:300])
  import torch
  from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
  from transformers import LlamaConfig

  if not torch.cuda.is_available():
    return dict(skipped="PEFT + bitsandbytes needs a CUDA GPU")
  s = shape_of(row, tiny)
  seq = 64 if tiny else row.seq
  cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"],
                    num_hidden_layers=s["layers"],
                    num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                    max_position_embeddings=max(seq, 8192),
                    rope_theta=500000.0, attn_implementation="sdpa")

  def linear4bit(child, w):
    # What BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    # bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16) builds.
    q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                          bias=False, compute_dtype=torch.bfloat16,
                          compress_statistics=True, quant_type="nf4",
                          device="meta")
    q._parameters["weight"] = bnb.nn.Params4bit(
        w, requires_grad=False, compress_statistics=True,
        quant_type="nf4", module=q).to("cuda")
    return q

  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = build_llama_layerwise(cfg, "cuda", linear4bit)
  model.is_loaded_in_4bit = True
  torch.cuda.empty_cache()
  model = prepare_model_for_kbit_training(model)
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32,
                                           target_modules=list(ts.TARGETS)))
  load = dict(load_s=time.perf_counter() - t0,
              load_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
  torch.cuda.reset_peak_memory_stats()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4)
  ids = torch.randint(0, s["vocab"], (row.batch, seq + 1), device="cuda")
  inputs, labels = ids[:, :-1], ids[:, 1:]
  losses, times = [], []
  for i in range(row.warmup + row.steps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    torch.cuda.synchronize()
    if i >= row.warmup:
      times.append(time.perf_counter() - t0)
  step_s = sum(times) / len(times)
  tokens = row.batch * seq
  return dict(load, shape=row.shape, config=s, seq=seq, batch=row.batch,
              tokens=tokens, step_s=step_s, tokens_per_s=tokens / step_s,
              peak_gib=torch.cuda.max_memory_allocated() / 2**30,
              loss_first=losses[0], loss_last=losses[-1],
              trainable=sum(p.numel() for p in trainable),
              floor_tflop=floor(s, tokens, seq) / 1e12)


# -- driver -----------------------------------------------------------------------

def child(args) -> None:
  row = ROWS[args.row]
  if row.system == "peft_bnb":
    result = run_peft_bnb(row, args.tiny)
  else:
    result = run_jlora(row, args.tiny, args.probe_limit_gib, args.profile,
                       args.trace_dir)
  print("RESULT " + json.dumps(result), flush=True)


def _devices(env) -> dict:
  """Device count and kind, asked of a child process (the parent never
  initialises a GPU, so each row's process has it to itself)."""
  code = ("import jax, json; d = jax.devices();"
          "print('DEV ' + json.dumps(dict(n=len(d), kind=d[0].device_kind,"
          " backend=jax.default_backend())))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=env, timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("DEV ")]
  if not lines:
    raise SystemExit(f"cannot start JAX: {proc.stderr[-2000:]}")
  return json.loads(lines[0][4:])


def _run_row(name: str, row: Row, args, env) -> dict:
  cmd = [sys.executable, __file__, "--row", name]
  if args.tiny:
    cmd.append("--tiny")
  if args.probe_limit_gib:
    cmd += ["--probe-limit-gib", str(args.probe_limit_gib)]
  if args.profile:
    cmd.append("--profile")
  if args.trace_dir:
    cmd += ["--trace-dir", args.trace_dir]
  timeout = min(row.timeout, args.timeout) if args.timeout else row.timeout
  if row.flags and not args.tiny:  # GPU flags: the CPU backend rejects them
    env = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " " +
                               row.flags).strip())
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=timeout)
    out, err = proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (
        e.stdout or "")
    err = f"timed out after {timeout:.0f} s"
  found = [json.loads(l[7:]) for l in out.splitlines()
           if l.startswith("RESULT ")]
  if found:
    r = found[0]
  else:
    tail = [l for l in (err or out).strip().splitlines() if l.strip()][-4:]
    r = dict(error=" | ".join(tail))
  r.update(row=name, gpus=row.gpus, strategy=row.strategy,
           wall_s=time.perf_counter() - t0)
  return r


def _fraction(r: dict) -> float | None:
  if "step_s" not in r:
    return None
  r["floor_fraction"] = (r["floor_tflop"] * 1e12 / r["step_s"] /
                         (FLOOR_TFLOPS * 1e12 * r["gpus"]))
  return r["floor_fraction"]


def report(results: list[dict]) -> str:
  head = (f"{'row':<19}{'GPUs':>5}  {'strategy':<36}{'tokens':>8}"
          f"{'tokens/s':>10}{'peak GiB/GPU':>14}{'floor @790':>12}")
  lines = [head, "-" * len(head)]
  done = {r["row"]: r for r in results if "tokens_per_s" in r}
  for r in results:
    name = f"{r['row']:<19}{r['gpus']:>5}  {r['strategy']:<36}"
    if "skipped" in r or "error" in r:
      why = r.get("skipped") or "error: " + r["error"]
      lines.append(name + why[:300])
      continue
    frac = _fraction(r)
    tokens = f"{r['batch']}x{r['seq']}"
    line = (f"{name}{tokens:>8}{r['tokens_per_s']:>10,.0f}"
            f"{r['peak_gib']:>14.2f}{frac * 100:>11.1f}%")
    base = ROWS[r["row"]].baseline
    if base in done:
      r["scaling"] = r["tokens_per_s"] / done[base]["tokens_per_s"]
      line += f"  {r['scaling']:.2f}x {base}"
    if "load_peak_gib" in r:
      line += f"  (load peak {r['load_peak_gib']:.2f} GiB)"
    lines.append(line)
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                 help=f"comma-separated, from {sorted(ROWS)}")
  p.add_argument("--tiny", action="store_true",
                 help="CPU-sized shapes (a smoke run of every code path)")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="simulate this many CPU devices (with --tiny)")
  p.add_argument("--timeout", type=float, default=None,
                 help="seconds per row (default: each row's own)")
  p.add_argument("--probe-limit-gib", type=float, default=None,
                 help="device memory for the context probe (default: the"
                 " device's own limit)")
  p.add_argument("--profile", action="store_true",
                 help="trace one more step of each jlora row: compute and"
                 " host-copy time per GPU, their overlap, the top kernels"
                 " (benchmarks/trace_summary.py)")
  p.add_argument("--trace-dir", default=None,
                 help="with --profile: keep each row's trace and compiled HLO"
                 " here")
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--row", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.row:
    return child(args)

  names = args.rows.split(",")
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise SystemExit(f"unknown rows {unknown}; choose from {sorted(ROWS)}")
  env = dict(os.environ)
  if args.cpu_devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count="
                        f"{args.cpu_devices}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
  devices = _devices(env)
  print(f"{devices['n']} device(s): {devices['kind']}", flush=True)
  results = []
  for name in names:
    row = ROWS[name]
    if row.gpus > devices["n"]:
      r = dict(row=name, gpus=row.gpus, strategy=row.strategy,
               skipped=f"needs {row.gpus} devices, {devices['n']} here")
    else:
      r = _run_row(name, row, args, env)
    results.append(r)
    status = r.get("skipped") or r.get("error") or (
        f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB")
    print(f"[{name}] {status}", file=sys.stderr, flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(partial=True, results=results), f, indent=1)
  table = report(results)
  print("\n" + table, flush=True)
  ts.emit_json(dict(floor_tflops_per_gpu=FLOOR_TFLOPS, devices=devices,
                    tiny=args.tiny, results=results, table=table), args.json)


if __name__ == "__main__":
  main()
