"""Long context: the longest trainable sequence of 8B LoRA on one GPU.

For the Llama-3-8B shape at batch 1, LoRA r=16 on the seven projections,
bf16, NF4 (double-quantized, layer by layer) and FP8 (e4m3, per output
channel) bases, each setting below finds the longest sequence whose training
step fits (doubling from --start, compile-only probes: XLA's memory analysis
of the step against the device's memory and the host's, nothing allocated),
then times tokens/s at --at (128k) and at that maximum. Each row (base x
setting) runs in its own subprocess, so its peak memory is its own; the
planner's estimate (`plan_memory`) is printed beside XLA's footprint of every
probe.

  python benchmarks/long_context.py --tiny      # CPU smoke run, MiB not GiB
  python benchmarks/long_context.py --rows bf16:full,bf16:offload --json a.json
  python benchmarks/long_context.py --rows nf4:host_tiled --no-time
  python benchmarks/long_context.py --rows bf16:tiled --seqs 131072 --no-probe

Settings (all remat="full", chunked cross-entropy; GPU attention cuDNN):
  full         today's: every layer's input kept on the device
  tiled        + mlp_chunk (the MLP and its LoRA products 8192 tokens at a
               time)
  offload      + the layer inputs (residual stream) in pinned host memory
  host_tiled   offload + tiled
  host_chunked host_tiled with attention="chunked" (flash attention in XLA)
               in place of cuDNN's kernel
  half_host_tiled  host_tiled with offload_fraction=0.5: half the residual
               stream on the host, for hosts smaller than the whole stream
               (512k tokens of 8B: 128 GiB)

One 512k step at the 8B shape is minutes of attention alone: probe first
(--no-time), then time single lengths (--no-probe --seqs N --warmup 0).

Columns: max length (tokens), tokens/s at --at and at the max, XLA's device
footprint and the planner's estimate at the max (GiB), the device's peak.
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

import train_step as ts  # noqa: E402  (emit_json; sets the GPU memory fraction)

SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_layers=32, num_heads=32, num_kv_heads=8)
SHAPE_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=192,
                  num_layers=2, num_heads=4, num_kv_heads=2)
TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
HOST = ("decoder_input",)
SETTINGS = {
  "full": dict(),
  "tiled": dict(mlp_chunk=8192),
  "offload": dict(offload=HOST),
  "host_tiled": dict(offload=HOST, mlp_chunk=8192),
  "host_chunked": dict(offload=HOST, mlp_chunk=8192, attention="chunked"),
  "half_host_tiled": dict(offload=HOST, offload_fraction=0.5, mlp_chunk=8192),
}
BASES = ("bf16", "nf4", "fp8")
# --tiny's rows: CPU stand-ins (XLA attention in place of cuDNN).
TINY_ROWS = "bf16:full,bf16:host_chunked,nf4:host_chunked,fp8:host_chunked"


@dataclasses.dataclass
class Args:
  tiny: bool
  start: int
  max_seq: int
  at: int
  steps: int
  warmup: int
  limit_gib: float | None
  probe: bool
  time: bool
  seqs: tuple[int, ...]
  ce: int


def setting_fields(name: str, tiny: bool, on_gpu: bool) -> dict:
  fields = dict(remat="full", offload=(), mlp_chunk=None,
                attention="cudnn" if on_gpu else "xla")
  fields.update(SETTINGS[name])
  if tiny and fields["mlp_chunk"]:
    fields["mlp_chunk"] = 128
  return fields


def config(tiny: bool, seq: int):
  from jlora.models import ModelConfig, RopeConfig
  shape = SHAPE_TINY if tiny else SHAPE_8B
  return ModelConfig(**shape, rms_norm_eps=1e-5,
                     max_position_embeddings=max(seq, 8192),
                     rope=RopeConfig(theta=500000.0))


class Step:
  """The jitted train step: wrap + return_hidden + causal_lm_loss + AdamW."""

  def __init__(self, cfg, fields: dict, ce: int):
    import jax
    import jax.numpy as jnp
    import optax

    import jlora
    from jlora.models import CausalLM
    from jlora.models.losses import causal_lm_loss

    self.cfg = cfg
    self.model = CausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True, **fields)
    self.tx = tx = optax.adamw(1e-4)
    forward = jlora.wrap(self.model.apply)

    def loss_fn(t, frozen, x, y):
      p = jlora.combine(t, frozen)
      h = forward({"params": p}, x, return_hidden=True)
      return causal_lm_loss(cfg, p, h, y, chunk_size=ce)

    def step(t, opt_state, frozen, x, y):
      loss, g = jax.value_and_grad(loss_fn)(t, frozen, x, y)
      u, opt_state = tx.update(g, opt_state, t)
      return optax.apply_updates(t, u), opt_state, loss

    self.step = jax.jit(step, donate_argnums=(0, 1))

  def adapt(self, params, key):
    import jlora
    lp = jlora.apply(params, rank=16, alpha=32.0, key=key, targets=TARGETS)
    trainable, frozen = jlora.partition(lp)
    return trainable, self.tx.init(trainable), frozen

  def abstract(self, quantize):
    import jax
    import jax.numpy as jnp

    import jlora

    def make(key):
      params = self.model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
      if quantize:
        params = jlora.quantize(params, quantize)
      return self.adapt(params, key)

    return jax.eval_shape(make, jax.random.key(0))


def footprint(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(xla_gib=(m.argument_size_in_bytes + m.temp_size_in_bytes
                      + m.output_size_in_bytes - m.alias_size_in_bytes)
             / 2**30)
  host = getattr(m, "host_temp_size_in_bytes", None)
  if host:
    out["xla_host_gib"] = host / 2**30
  return out


def plan(cfg, seq, fields, quantize, on_gpu) -> dict:
  from jlora.models import plan_memory
  (p,) = plan_memory(cfg, seq, settings=[fields], quantize=quantize,
                     backend="gpu" if on_gpu else "cpu")
  return dict(plan_gib=p.device_bytes / 2**30, plan_host_gib=p.host_bytes
              / 2**30)


def probe(base, name, args: Args, limit, log) -> tuple[int | None, list]:
  """Doubles the length from args.start while XLA says the step fits."""
  import jax
  on_gpu = jax.default_backend() == "gpu"
  quantize = None if base == "bf16" else base
  host = ts.host_limit()
  best, probes, seq = None, [], args.start
  while seq <= args.max_seq:
    cfg = config(args.tiny, seq)
    fields = setting_fields(name, args.tiny, on_gpu)
    t0 = time.perf_counter()
    row = dict(seq=seq, **plan(cfg, seq, fields, quantize, on_gpu))
    try:
      step = Step(cfg, fields, min(args.ce, seq))
      t, o, f = step.abstract(quantize)
      x = jax.ShapeDtypeStruct((1, seq), "int32")
      row.update(footprint(step.step.lower(t, o, f, x, x).compile()))
      host_need = max(row.get("xla_host_gib", 0), row["plan_host_gib"])
      fits = ((limit is None or row.get("xla_gib", 0) * 2**30 < 0.97 * limit)
              and (host is None or host_need * 2**30 < host))
    except Exception as e:  # noqa: BLE001  (compile-time OOM and the like)
      row["error"], fits = str(e)[:200], False
    row.update(fits=fits, compile_s=time.perf_counter() - t0)
    probes.append(row)
    log(f"probe {row}")
    if not fits:
      break
    best, seq = seq, 2 * seq
  return best, probes


def timed(base, name, seq, args: Args, log) -> dict:
  """Makes the model and times args.steps steps (after one warm-up)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jlora import models
  on_gpu = jax.default_backend() == "gpu"
  cfg = config(args.tiny, seq)
  fields = setting_fields(name, args.tiny, on_gpu)
  step = Step(cfg, fields, min(args.ce, seq))
  _, params = models.from_config(
    cfg, jax.random.key(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
    scan_layers=True, quantize=None if base == "bf16" else base)
  t, o, f = step.adapt(params, jax.random.key(1))
  del params
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq + 1),
                                          dtype=np.int32)
  x, y = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
  t0 = time.perf_counter()
  compiled = step.step.lower(t, o, f, x, y).compile()
  out = dict(seq=seq, compile_s=time.perf_counter() - t0,
             **footprint(compiled))
  first = None
  for _ in range(args.warmup):
    t, o, loss = compiled(t, o, f, x, y)
    first = float(loss)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    t, o, loss = compiled(t, o, f, x, y)
  jax.block_until_ready((t, o, loss))
  step_s = (time.perf_counter() - t0) / args.steps
  stats = jax.devices()[0].memory_stats() or {}
  out.update(step_s=step_s, tokens_per_s=seq / step_s, loss_first=first,
             loss_last=float(loss),
             peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)
  log(f"timed {out}")
  return out


def run_row(base: str, name: str, args: Args) -> dict:
  import jax

  def log(msg):
    print(f"[{base}:{name}] {msg}", file=sys.stderr, flush=True)

  stats = jax.devices()[0].memory_stats() or {}
  limit = (args.limit_gib * 2**30 if args.limit_gib
           else stats.get("bytes_limit"))
  out = dict(base=base, setting=name,
             fields=setting_fields(name, args.tiny,
                                   jax.default_backend() == "gpu"),
             device=jax.devices()[0].device_kind,
             limit_gib=(limit or 0) / 2**30)
  out["fields"]["offload"] = list(out["fields"]["offload"])
  best = None
  if args.probe:
    best, out["probes"] = probe(base, name, args, limit, log)
    out["max_seq"] = best
  lengths = list(args.seqs)
  if args.time and not lengths:
    lengths = sorted({s for s in (args.at, best) if s and (not best
                                                           or s <= best)})
  out["timed"] = []
  for seq in lengths:
    try:
      out["timed"].append(timed(base, name, seq, args, log))
    except Exception as e:  # noqa: BLE001  (runtime OOM: report, go on)
      out["timed"].append(dict(seq=seq, error=str(e)[:300]))
  return out


def table(rows: list[dict], at: int, unit: str = "GiB") -> str:
  scale = 1024 if unit == "MiB" else 1
  head = (f"{'base':5s} {'setting':13s} {'max seq':>8s} "
          f"{'tok/s@' + str(at):>12s} {'tok/s@max':>10s} {'xla ' + unit:>8s} "
          f"{'plan ' + unit:>8s} {'peak ' + unit:>8s}")
  lines = [head]
  for r in rows:
    if "error" in r and "timed" not in r:
      lines.append(f"{r['base']:5s} {r['setting']:13s} error: {r['error']}")
      continue
    timed_at = {x["seq"]: x for x in r.get("timed", [])}
    best = r.get("max_seq")
    fit = next((p for p in r.get("probes", []) if p["seq"] == best), {})
    at_max = timed_at.get(best, {})

    def f(v, fmt, gib=False):
      if not isinstance(v, (int, float)):
        return "-"
      return format(v * scale if gib else v, fmt)

    lines.append(
      f"{r['base']:5s} {r['setting']:13s} {f(best, '8d'):>8s} "
      f"{f(timed_at.get(at, {}).get('tokens_per_s'), '12.0f'):>12s} "
      f"{f(at_max.get('tokens_per_s'), '10.0f'):>10s} "
      f"{f(fit.get('xla_gib'), '8.1f', 1):>8s} "
      f"{f(fit.get('plan_gib'), '8.1f', 1):>8s} "
      f"{f(at_max.get('peak_gib'), '8.1f', 1):>8s}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true",
                 help="CPU sizes: tiny model, 256..4096 tokens, 24 MiB limit")
  p.add_argument("--rows", default=None,
                 help="base:setting,... (default all; --tiny: three)")
  p.add_argument("--start", type=int, default=32768)
  p.add_argument("--max-seq", type=int, default=1 << 20)
  p.add_argument("--at", type=int, default=131072)
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--ce", type=int, default=8192,
                 help="cross-entropy chunk (tokens)")
  p.add_argument("--limit-gib", type=float, default=None,
                 help="device budget (default: the device's bytes_limit)")
  p.add_argument("--seqs", default="",
                 help="time these lengths (comma-separated) as given")
  p.add_argument("--no-probe", action="store_true")
  p.add_argument("--no-time", action="store_true")
  p.add_argument("--timeout", type=float, default=570.0,
                 help="seconds per row (subprocess)")
  p.add_argument("--json", default=None)
  p.add_argument("--row", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  args = Args(tiny=a.tiny, start=a.start, max_seq=a.max_seq, at=a.at,
              steps=a.steps, warmup=a.warmup, limit_gib=a.limit_gib,
              probe=not a.no_probe, time=not a.no_time,
              seqs=tuple(int(s) for s in a.seqs.split(",") if s), ce=a.ce)
  if a.tiny:
    args = dataclasses.replace(
      args, start=512, max_seq=min(a.max_seq, 2048), at=512, ce=256,
      limit_gib=a.limit_gib or 24 / 1024)
  if a.rows is None:
    a.rows = TINY_ROWS if a.tiny else ",".join(
      f"{b}:{s}" for b in BASES for s in SETTINGS)
  if a.row:  # one row, in this process
    base, name = a.row.split(":")
    print("ROW " + json.dumps(run_row(base, name, args)), flush=True)
    return
  rows = [r.split(":") for r in a.rows.split(",") if r]
  for base, name in rows:
    if base not in BASES or name not in SETTINGS:
      sys.exit(f"unknown row {base}:{name}; bases {BASES}, settings "
               f"{tuple(SETTINGS)}")
  results = []
  for base, name in rows:
    if a.tiny:  # no subprocess: CPU, and the import costs more than the row
      results.append(run_row(base, name, args))
      continue
    cmd = [sys.executable, __file__, "--row", f"{base}:{name}",
           *sys.argv[1:]]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=a.timeout)
      sys.stderr.write(proc.stderr[-4000:])
      line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
      results.append(json.loads(line[-1][4:]) if line else dict(
        base=base, setting=name, error=proc.stderr.strip()[-300:]))
    except subprocess.TimeoutExpired:
      results.append(dict(base=base, setting=name,
                          error=f"timed out after {a.timeout:.0f} s"))
  print(table(results, args.at, "MiB" if a.tiny else "GiB"))
  ts.emit_json(dict(benchmark="long_context", tiny=a.tiny,
                    at=args.at, rows=results), a.json)


if __name__ == "__main__":
  main()
