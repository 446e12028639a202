"""QLoRA train-step throughput and memory: jlora NF4 vs PEFT + bitsandbytes.

One invocation runs every system in its own subprocess (so each owns the GPU
and its peak memory is its own), then prints a table and a JSON line.

  python benchmarks/qlora_step.py --shape 8b                # on a GPU machine
  python benchmarks/qlora_step.py --shape tiny --systems jlora_nf4,jlora
                                                            # CPU smoke run

Systems:
  jlora_nf4   the Llama-shaped model of `train_step.py` (its `run_jax`,
              system "jlora", imported, not copied) with the seven projections
              stored NF4 with double quantization (`jlora.quant.quantize`,
              block 64, bf16 compute), LoRA through `jlora.apply` +
              `jlora.wrap`, every layer rematerialised. The base is quantized
              inside the jitted init (model.init is wrapped for this run), so
              the dense bf16 kernels exist only as temporaries of that one
              XLA program, never as arrays the process holds.
  jlora       the same without quantization (bf16 base), for reference.
  jlora_nf4_host_opt  jlora_nf4 with AdamW's state in pinned host memory
              (`jlora.quant.host_offloaded`).
  peft_qlora  transformers' LlamaForCausalLM, every decoder nn.Linear replaced
              by bitsandbytes' Linear4bit (NF4, double quantization, bf16
              compute; lm_head kept, as transformers' BitsAndBytesConfig
              does), `prepare_model_for_kbit_training` (gradient
              checkpointing on), PEFT LoRA on the same seven projections.
              bitsandbytes is imported from $JLORA_BNB: a wheel file or a
              directory holding the package (default: ./.whl/*.whl, then an
              installed copy).

Every system: random init, batch x seq tokens of next-token cross-entropy,
AdamW, LoRA r=16, alpha=32; median of --steps steps after --warmup steps.
Peak memory: JAX's `peak_bytes_in_use` over the whole process (loading
included; "load GiB" is what is held, and "load peak" the peak, once the
params are ready); PyTorch's `max_memory_allocated` reset after loading, so
its peak is the training peak, with the loading peak reported beside it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # train_step, and jlora itself
from train_step import (SHAPES, TARGETS, Result,  # noqa: E402
                        base_parser, common_flags, emit_json, floor_flops,
                        floor_fraction, shape_line,
                        matmul_tflops, run_jax, run_systems)

SYSTEMS = ("jlora_nf4", "peft_qlora", "jlora", "jlora_nf4_host_opt")
_LOAD = {}


# -- JAX -----------------------------------------------------------------------

def run_jlora(system: str, s: dict, rank: int, alpha: float, steps: int,
              warmup: int) -> Result:
  """`train_step.run_jax("jlora", ...)`, remat on, NF4 base for jlora_nf4."""
  import jax

  import jlora

  init_params = _quantized_init if system.startswith("jlora_nf4") else None
  tx = None
  if system == "jlora_nf4_host_opt":
    import optax
    tx = jlora.quant.host_offloaded(optax.adamw(1e-4))

  apply = jlora.apply

  def measured_apply(params, *args, **kwargs):
    # Called once, right after the params are made: what loading left.
    jax.block_until_ready(params)
    stats = jax.devices()[0].memory_stats() or {}
    _LOAD.update(load_gib=stats.get("bytes_in_use", 0) / 2**30,
                 load_peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                 base_gib=_tree_gib(params))
    return apply(params, *args, **kwargs)

  jlora.apply = measured_apply
  result = run_jax("jlora", s, rank, alpha, steps, warmup, remat=True,
                   init_params=init_params, tx=tx)
  result.system = system
  result.note = {"jlora_nf4": "nf4+dq, remat",
                 "jlora_nf4_host_opt": "nf4+dq, remat, opt state on host"
                 }.get(system, "bf16, remat")
  return result


def _quantized_init(model, key, inputs):
  """Random params made leaf by leaf, stacked kernels layer by layer, each
  quantized (NF4, double quantization) as soon as it exists: the process
  never holds more than one dense layer of one kernel, as when quantizing
  while loading a checkpoint."""
  import functools

  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from jlora import quant

  shapes = traverse_util.flatten_dict(
      jax.eval_shape(model.init, key, inputs)["params"], sep="/")
  @functools.partial(jax.jit, static_argnums=(1, 2, 3))
  def make(k, shape, dtype, quantized):
    x = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    if quantized:
      return quant.quantize_array(x, "nf4", double_quant=True, stacked=1)
    return x

  params = {}
  for i, (path, sds) in enumerate(shapes.items()):
    k = jax.random.fold_in(key, i)
    name = path.rsplit("/", 1)[0]
    if "norm" in name:
      params[path] = jnp.ones(sds.shape, sds.dtype)
    elif any(f"{t}/kernel" in path for t in TARGETS):
      layers = [make(jax.random.fold_in(k, l), (1, *sds.shape[1:]), sds.dtype,
                     True) for l in range(sds.shape[0])]
      params[path] = jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *layers)
      del layers
    else:
      params[path] = make(k, sds.shape, sds.dtype, False)
  return traverse_util.unflatten_dict(params, sep="/")


def _tree_gib(tree) -> float:
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**30


# -- PyTorch / PEFT / bitsandbytes ---------------------------------------------

def _import_bnb():
  """bitsandbytes from $JLORA_BNB (wheel or directory), else ./.whl, else
  an installed copy."""
  src = os.environ.get("JLORA_BNB")
  if src is None:
    wheels = sorted(glob.glob(os.path.join(_HERE, "..", ".whl",
                                           "bitsandbytes-*.whl")))
    src = wheels[-1] if wheels else None
  if src and src.endswith(".whl"):
    target = os.path.join(tempfile.gettempdir(), "jlora_bnb_" +
                          os.path.basename(src)[:-4])
    if not os.path.isdir(os.path.join(target, "bitsandbytes")):
      with zipfile.ZipFile(src) as z:
        z.extractall(target)
    src = target
  if src:
    sys.path.insert(0, src)
  import bitsandbytes
  return bitsandbytes


def run_peft_qlora(system: str, s: dict, rank: int, alpha: float, steps: int,
                   warmup: int) -> Result:
  bnb = _import_bnb()  # before peft, which looks for it once on import
  import torch
  from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
  from transformers import LlamaConfig, LlamaForCausalLM

  if not torch.cuda.is_available():
    raise RuntimeError("peft_qlora needs a CUDA GPU (bitsandbytes NF4)")
  torch.manual_seed(0)
  cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"],
                    num_hidden_layers=s["layers"],
                    num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                    max_position_embeddings=s["seq"],
                    attn_implementation="sdpa")
  torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU
  try:
    with torch.device("cuda"):
      model = LlamaForCausalLM(cfg)
  finally:
    torch.set_default_dtype(torch.float32)
  # What from_pretrained(quantization_config=BitsAndBytesConfig(
  # load_in_4bit=True, bnb_4bit_quant_type="nf4",
  # bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)) builds:
  # every decoder Linear as Linear4bit, quantized as it is placed on the GPU.
  for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, child in list(parent.named_children()):
        if not isinstance(child, torch.nn.Linear):
          continue
        q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                              bias=child.bias is not None,
                              compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4",
                              device="meta")
        # Params4bit quantizes when moved to a device, as transformers'
        # bitsandbytes loader does it, parameter by parameter.
        q._parameters["weight"] = bnb.nn.Params4bit(
            child.weight.data, requires_grad=False, compress_statistics=True,
            quant_type="nf4", module=q).to("cuda")
        if child.bias is not None:
          q.bias = child.bias
        setattr(parent, name, q)
        del child
  model.is_loaded_in_4bit = True
  torch.cuda.empty_cache()
  model = prepare_model_for_kbit_training(model)
  model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                           target_modules=list(TARGETS)))
  load_peak = torch.cuda.max_memory_allocated() / 2**30
  _LOAD.update(load_gib=torch.cuda.memory_allocated() / 2**30,
               load_peak_gib=load_peak)
  torch.cuda.reset_peak_memory_stats()

  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4)
  ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device="cuda")
  inputs, labels = ids[:, :-1], ids[:, 1:]
  losses, times = [], []
  for i in range(warmup + steps):
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
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return Result(system, step_s, s["batch"] * s["seq"] / step_s,
                torch.cuda.max_memory_allocated() / 2**30, losses[0],
                losses[-1], sum(p.numel() for p in trainable),
                "nf4+dq, gradient checkpointing")


# -- driver --------------------------------------------------------------------

def child(args) -> None:
  s = SHAPES[args.shape]
  runner = run_peft_qlora if args.system.startswith("peft") else run_jlora
  result = runner(args.system, s, args.rank, args.alpha, args.steps,
                  args.warmup)
  out = {**dataclasses.asdict(result), **_LOAD}
  print("RESULT " + json.dumps(out), flush=True)
  if args.matmul:
    print("MATMUL " + json.dumps({"tflops": matmul_tflops()}), flush=True)


def main() -> None:
  args = base_parser(__doc__.splitlines()[0], "8b", SYSTEMS).parse_args()
  if args.system:
    return child(args)

  results, tflops = run_systems(__file__, args.systems.split(","),
                                common_flags(args))

  s = SHAPES[args.shape]
  flops = floor_flops(s)
  ref = {r["system"]: r for r in results if "error" not in r}
  print("\n" + shape_line(args, flops, tflops))
  header = (f"{'system':<12}{'step (s)':>10}{'tokens/s':>11}{'peak GiB':>10}"
            f"{'load GiB':>10}{'load peak':>10}{'floor %':>9}"
            f"{'vs peft':>9}{'loss0->N':>17}")
  print(header)
  print("-" * len(header))
  for r in results:
    if "error" in r:
      print(f"{r['system']:<12} error: {r['error'][:200]}")
      continue
    floor = 100 * floor_fraction(r, flops, tflops)
    vs = (f"{r['tokens_per_s'] / ref['peft_qlora']['tokens_per_s']:.2f}x"
          if "peft_qlora" in ref else "-")
    print(f"{r['system']:<12}{r['step_s']:>10.4f}{r['tokens_per_s']:>11,.0f}"
          f"{r['peak_gib']:>10.2f}{r.get('load_gib', 0):>10.2f}"
          f"{r.get('load_peak_gib', 0):>10.2f}{floor:>8.1f}%{vs:>9}"
          f"{r['loss_first']:>8.3f}->{r['loss_last']:.3f}")
  out = dict(shape=args.shape, config=s, rank=args.rank, alpha=args.alpha,
             matmul_tflops=tflops, floor_tflop=flops / 1e12, results=results)
  emit_json(out, args.json)


if __name__ == "__main__":
  main()
