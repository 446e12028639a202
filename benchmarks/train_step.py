"""LoRA train-step throughput and memory: jlora vs hand-written JAX vs PEFT.

One invocation runs every system in its own subprocess (so each owns the GPU
and its peak memory is its own), then prints a table and writes JSON.

  python benchmarks/train_step.py --shape 1b            # on a GPU machine
  python benchmarks/train_step.py --shape tiny          # CPU smoke run

Systems:
  jlora        Flax Llama-shaped model with plain Dense layers; LoRA through
               `jlora.apply` + `jlora.wrap` (factored forward).
  hand         the same model with LoRA written inline in each Dense:
               x @ W + s * (x @ A) @ B.
  merged       the same model forming W + s * A @ B every step.
  peft         HuggingFace PEFT LoRA on transformers' LlamaForCausalLM, eager.
  peft_compile the same under torch.compile.

Model: Llama-shaped, random init, bf16 weights, scan over layers, cuDNN
attention on GPU; batch x seq tokens of next-token cross-entropy, AdamW; LoRA
on q, k, v, o, gate, up, down.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time

# JAX takes 75% of a GPU's memory unless told otherwise; PyTorch, which these
# benchmarks compare against, can use all of it. Set before any backend starts
# (the scripts run each system in a subprocess, which inherits it).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


def _meminfo(key: str) -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# XLA's GPU client pins at most 64 GB of host memory unless told more, and the
# offloading rows keep the residual stream there (70B at 64k tokens: 80 GiB).
if (_free := _meminfo("MemAvailable")) is not None:
  os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB",
                        str(int(0.9 * _free / 1e9)))


def host_limit() -> float | None:
  """Bytes of pinned host memory a step may plan on: 85% of what the host has
  free, and no more than XLA's GPU client will pin."""
  free = _meminfo("MemAvailable")
  if free is None:
    return None
  pinned = os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")
  return min(0.85 * free, float(pinned) * 1e9 if pinned else 64e9)


SHAPES = {
    # TinyLlama-1.1B shape, as in the anchors.
    "1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4,
               vocab=32000, batch=8, seq=1024),
    # Llama-3-8B shape.
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8,
               vocab=128256, batch=2, seq=2048),
    "tiny": dict(hidden=128, inter=256, layers=2, heads=4, kv_heads=2,
                 vocab=512, batch=2, seq=64),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")
SYSTEMS = ("jlora", "hand", "merged", "peft", "peft_compile")


@dataclasses.dataclass
class Result:
  system: str
  step_s: float
  tokens_per_s: float
  peak_gib: float
  loss_first: float
  loss_last: float
  trainable: int
  note: str = ""


def param_count(s: dict) -> int:
  h, i, L, v = s["hidden"], s["inter"], s["layers"], s["vocab"]
  kv = s["kv_heads"] * h // s["heads"]
  per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
  return L * per_layer + 2 * v * h + h


def floor_flops(s: dict) -> float:
  """Forward + input gradient of every matmul, plus attention (non-causal)."""
  tokens = s["batch"] * s["seq"]
  attention = 12 * s["batch"] * s["seq"] ** 2 * s["hidden"] * s["layers"]
  return 4 * param_count(s) * tokens + attention


# -- JAX systems ---------------------------------------------------------------

def run_jax(system: str, s: dict, rank: int, alpha: float, steps: int,
            warmup: int, remat: bool, init_params=None,
            tx=None) -> Result:
  """One JAX system's measured steps; `init_params(model, key, inputs)`
  replaces the default jitted `model.init` (e.g. to quantize while
  initialising) and `tx` the default AdamW(1e-4)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax import traverse_util

  import jlora

  on_gpu = jax.default_backend() == "gpu"
  dt = jnp.bfloat16
  scale = alpha / rank
  head_dim = s["hidden"] // s["heads"]
  init = nn.initializers.normal(0.02)

  class Dense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", init, (x.shape[-1], self.features), dt)
      if system == "jlora":
        return x @ kernel
      a = self.param("lora_a", nn.initializers.normal(1 / x.shape[-1] ** 0.5),
                     (x.shape[-1], rank), jnp.float32)
      b = self.param("lora_b", nn.initializers.zeros, (rank, self.features),
                     jnp.float32)
      kernel = jax.lax.stop_gradient(kernel)
      if system == "hand":
        return x @ kernel + ((x @ a.astype(dt)) * scale).astype(dt) @ b.astype(dt)
      return x @ (kernel + (scale * a @ b).astype(dt))

  def rms(x, w, eps=1e-5):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return (xf * w).astype(dt)

  def rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos[:, None].astype(jnp.float32) * inv[None]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                           -1).astype(dt)

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      B, T, _ = h.shape
      pos = jnp.arange(T)
      x = rms(h, self.param("input_layernorm", nn.initializers.ones,
                            (s["hidden"],), jnp.float32))
      q = Dense(s["heads"] * head_dim, name="q_proj")(x)
      k = Dense(s["kv_heads"] * head_dim, name="k_proj")(x)
      v = Dense(s["kv_heads"] * head_dim, name="v_proj")(x)
      q = rope(q.reshape(B, T, s["heads"], head_dim), pos)
      k = rope(k.reshape(B, T, s["kv_heads"], head_dim), pos)
      v = v.reshape(B, T, s["kv_heads"], head_dim)
      o = jax.nn.dot_product_attention(
          q, k, v, is_causal=True,
          implementation="cudnn" if on_gpu else None)
      h = h + Dense(s["hidden"], name="o_proj")(o.reshape(B, T, -1))
      x = rms(h, self.param("post_attention_layernorm", nn.initializers.ones,
                            (s["hidden"],), jnp.float32))
      g = Dense(s["inter"], name="gate_proj")(x)
      u = Dense(s["inter"], name="up_proj")(x)
      return h + Dense(s["hidden"], name="down_proj")(jax.nn.silu(g) * u), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = self.param("embed_tokens", init, (s["vocab"], s["hidden"]), dt)
      h = emb[ids]
      layer = nn.remat(Layer, prevent_cse=False) if remat else Layer
      h, _ = nn.scan(layer, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=s["layers"])(
                         name="layers")(h, None)
      h = rms(h, self.param("norm", nn.initializers.ones, (s["hidden"],),
                            jnp.float32))
      return Dense(s["vocab"], name="lm_head")(h) if system == "jlora" else (
          h @ self.param("lm_head", init, (s["hidden"], s["vocab"]), dt))

  model = Model()
  key = jax.random.key(0)
  ids = jax.random.randint(key, (s["batch"], s["seq"] + 1), 0, s["vocab"])
  inputs, labels = ids[:, :-1], ids[:, 1:]
  if init_params is None:
    params = jax.jit(model.init)(key, inputs)["params"]
  else:
    params = init_params(model, key, inputs)

  if system == "jlora":
    lp = jlora.apply(params, rank=rank, alpha=alpha, key=key,
                     targets="|".join(TARGETS))
    trainable, frozen = jlora.partition(lp)
    forward = jlora.wrap(model.apply)
    combine = jlora.combine
  else:
    flat = traverse_util.flatten_dict(params, sep="/")
    is_lora = lambda k: k.endswith("lora_a") or k.endswith("lora_b")
    trainable = {k: v for k, v in flat.items() if is_lora(k)}
    frozen = {k: v for k, v in flat.items() if not is_lora(k)}
    forward = model.apply
    combine = lambda t, f: traverse_util.unflatten_dict({**t, **f}, sep="/")
  del params

  tx = optax.adamw(1e-4) if tx is None else tx
  opt_state = tx.init(trainable)

  def loss_fn(t, frozen):
    logits = forward({"params": combine(t, frozen)}, inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(t, opt_state, frozen):
    loss, g = jax.value_and_grad(loss_fn)(t, frozen)
    u, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, u), opt_state, loss

  losses, times = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    trainable, opt_state, loss = step(trainable, opt_state, frozen)
    loss = float(loss)  # syncs
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    losses.append(loss)
  stats = jax.devices()[0].memory_stats() or {}
  step_s = statistics.median(times)
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  return Result(system, step_s, s["batch"] * s["seq"] / step_s,
                stats.get("peak_bytes_in_use", 0) / 2**30, losses[0],
                losses[-1], int(n_train), "remat" if remat else "")


def matmul_tflops() -> float:
  import jax
  import jax.numpy as jnp
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e12


# -- PyTorch / PEFT --------------------------------------------------------------

def torch_steps(model, opt, inputs, labels, device: str, warmup: int,
                steps: int, compile_: bool = False):
  """Times a PyTorch causal-LM train step: (losses, median step s, peak GiB).

  The loss is float32 cross-entropy of `model(input_ids=inputs).logits`
  against `labels`, optionally under `torch.compile`; `warmup` untimed steps
  come first.
  """
  import statistics
  import time

  import torch

  def loss_fn(inputs, labels):
    logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

  if compile_:
    loss_fn = torch.compile(loss_fn)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  losses, times = [], []
  for i in range(warmup + steps):
    sync()
    t0 = time.perf_counter()
    loss = loss_fn(inputs, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    sync()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
  return losses, statistics.median(times), peak


def run_peft(system: str, s: dict, rank: int, alpha: float, steps: int,
             warmup: int, remat: bool) -> Result:
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import LlamaConfig, LlamaForCausalLM

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"],
                    num_hidden_layers=s["layers"],
                    num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                    max_position_embeddings=s["seq"], attn_implementation="sdpa")
  model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
  if remat:
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
  model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                           target_modules=list(TARGETS)))
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4)
  ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)
  inputs, labels = ids[:, :-1], ids[:, 1:]

  losses, step_s, peak = torch_steps(model, opt, inputs, labels, device,
                                     warmup, steps,
                                     compile_=system == "peft_compile")
  return Result(system, step_s, s["batch"] * s["seq"] / step_s, peak,
                losses[0], losses[-1], sum(p.numel() for p in trainable),
                "remat" if remat else "")


# -- driver ------------------------------------------------------------------------

def shape_line(args, flops: float, tflops: float | None) -> str:
  """The table's first line: shape, LoRA, measured matmul rate, FLOP floor."""
  return (f"shape {args.shape}: {SHAPES[args.shape]}; LoRA r={args.rank}"
          f" alpha={args.alpha}; bf16 matmul {tflops or 0:.0f} TFLOP/s;"
          f" floor {flops / 1e12:.1f} TFLOP/step")


def floor_fraction(r: dict, flops: float, tflops: float | None) -> float:
  """Stores and returns the fraction of the FLOP floor a result reached."""
  r["floor_fraction"] = (flops / (tflops * 1e12) / r["step_s"]
                         if tflops else 0.0)
  return r["floor_fraction"]


def emit_json(out: dict, path: str | None) -> None:
  """Prints ``JSON {...}`` (the line the device runs are read from) and
  writes `out` to `path` when one is given."""
  print("JSON " + json.dumps(out))
  if path:
    with open(path, "w") as f:
      json.dump(out, f, indent=1)


def common_flags(args) -> list[str]:
  return ["--shape", args.shape, "--rank", str(args.rank), "--alpha",
          str(args.alpha), "--steps", str(args.steps), "--warmup",
          str(args.warmup)]


def run_systems(script: str, systems: list[str], flags: list[str],
                timeout: float | None = None) -> tuple[list[dict], float | None]:
  """Runs `script --system S` for each system in its own process.

  Each child prints one ``RESULT {json}`` line (the first also a ``MATMUL``
  line with the measured bf16 rate); a child that fails or times out gives
  an ``error`` entry with the end of its output.
  """
  results, tflops = [], None
  for i, system in enumerate(systems):
    cmd = [sys.executable, script, "--system", system, *flags]
    if i == 0:
      cmd.append("--matmul")
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=timeout)
      out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
      out, err = e.stdout or "", e.stderr or ""
      out = out.decode() if isinstance(out, bytes) else out
      err = err.decode() if isinstance(err, bytes) else err
      # The last thing the child said is where it was stuck.
      err = f"{err.strip()}\ntimed out after {timeout} s"
    lines = out.splitlines()
    found = [json.loads(l[7:]) for l in lines if l.startswith("RESULT ")]
    mm = [json.loads(l[7:]) for l in lines if l.startswith("MATMUL ")]
    if mm:
      tflops = mm[0]["tflops"]
    if found:
      results.append(found[0])
    else:
      tail = (err or out).strip().splitlines()[-3:]
      results.append(dict(system=system, error=" | ".join(tail)))
    print(f"[{system}] done", file=sys.stderr, flush=True)
  return results, tflops


def child(args) -> None:
  s = SHAPES[args.shape]
  runner = run_peft if args.system.startswith("peft") else run_jax
  result = runner(args.system, s, args.rank, args.alpha, args.steps,
                  args.warmup, args.remat)
  print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)
  if args.matmul:
    print("MATMUL " + json.dumps({"tflops": matmul_tflops()}), flush=True)


def base_parser(description: str, shape: str,
                systems: tuple[str, ...]) -> argparse.ArgumentParser:
  """The flags every train-step benchmark shares (and `common_flags` passes)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--shape", choices=sorted(SHAPES), default=shape)
  p.add_argument("--systems", default=",".join(systems))
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--system", help=argparse.SUPPRESS)
  p.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
  return p


def main() -> None:
  p = base_parser(__doc__.splitlines()[0], "1b", SYSTEMS)
  p.add_argument("--remat", action="store_true",
                 help="rematerialise every layer (JAX) / gradient checkpointing (PEFT)")
  args = p.parse_args()
  if args.system:
    return child(args)

  extra = ["--remat"] if args.remat else []
  results, tflops = run_systems(__file__, args.systems.split(","),
                                common_flags(args) + extra)

  s = SHAPES[args.shape]
  flops = floor_flops(s)
  ref = {r["system"]: r for r in results if "error" not in r}
  print("\n" + shape_line(args, flops, tflops))
  header = (f"{'system':<14}{'step (s)':>10}{'tokens/s':>12}{'peak GiB':>10}"
            f"{'floor %':>9}{'vs hand':>9}{'vs peft':>9}{'loss0->N':>18}")
  print(header)
  print("-" * len(header))
  for r in results:
    if "error" in r:
      print(f"{r['system']:<14} error: {r['error'][:200]}")
      continue
    floor = 100 * floor_fraction(r, flops, tflops)
    vs = lambda k: (f"{r['tokens_per_s'] / ref[k]['tokens_per_s']:.2f}x"
                    if k in ref else "-")
    print(f"{r['system']:<14}{r['step_s']:>10.4f}{r['tokens_per_s']:>12,.0f}"
          f"{r['peak_gib']:>10.2f}{floor:>8.1f}%{vs('hand'):>9}{vs('peft'):>9}"
          f"{r['loss_first']:>9.3f}->{r['loss_last']:.3f}")
  out = dict(shape=args.shape, config=s, rank=args.rank, alpha=args.alpha,
             matmul_tflops=tflops, floor_tflop=flops / 1e12, results=results)
  emit_json(out, args.json)


if __name__ == "__main__":
  main()
