"""Does XLA turn jlora's FP8 products into cuBLASLt FP8 GEMMs? (GPU check)

Compiles one LoRA training step (forward + backward) of a 2-layer Llama at
the TinyLlama-1.1B width (hidden 2048, intermediate 5632, scan over layers,
r=16 on the seven projections) on an FP8 base, and counts in the optimized
HLO: cuBLAS(Lt) custom calls by target (an FP8 GEMM is
``__cublas$lt$matmul$f8``), transposes of e4m3 arrays (the kernel laid
out K-major for cuBLASLt), and dots that still read e4m3 data (products
XLA did not rewrite). Seconds on a GPU; on CPU it shows the upcast path.

  PYTHONPATH=. python benchmarks/fp8_hlo.py [--scaling channel|tensor] [--dump DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora.models import LlamaForCausalLM, ModelConfig

TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scaling", default="channel", choices=["channel", "tensor"])
  p.add_argument("--product", default="auto", choices=["auto", "fp8"])
  p.add_argument("--dump", default=None, help="write the optimized HLO here")
  args = p.parse_args()

  cfg = ModelConfig(vocab_size=32000, hidden_size=2048,
                    intermediate_size=5632, num_layers=2, num_heads=32,
                    num_kv_heads=4, rms_norm_eps=1e-5,
                    max_position_embeddings=1024)
  on_gpu = jax.default_backend() == "gpu"
  model = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True, "mlp",
                           "cudnn" if on_gpu else "xla")
  ids = jnp.zeros((8, 1025), jnp.int32)
  tx = optax.adamw(1e-4)

  def make(key):
    params = model.init(key, ids[:1, :8])["params"]
    params = jlora.quant.quantize_fp8(params, scaling=args.scaling,
                                      product=args.product, targets=TARGETS)
    lp = jlora.apply(params, rank=16, alpha=32.0, key=key, targets=TARGETS)
    trainable, frozen = jlora.partition(lp)
    return trainable, frozen, tx.init(trainable)

  forward = jlora.wrap(model.apply)

  def step(t, opt_state, frozen, ids):
    def loss_fn(t):
      logits = forward({"params": jlora.combine(t, frozen)}, ids[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
    loss, g = jax.value_and_grad(loss_fn)(t)
    u, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, u), opt_state, loss

  t, frozen, opt = jax.eval_shape(make, jax.random.key(0))
  text = jax.jit(step).lower(t, opt, frozen, ids).compile().as_text()
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
    with open(os.path.join(args.dump, f"fp8_{args.scaling}.hlo.txt"), "w") as f:
      f.write(text)
  calls = re.findall(r'custom_call_target="([^"]+)"', text)
  counts = {c: calls.count(c) for c in sorted(set(calls))}
  f8_transposes = len(re.findall(r"= f8e4m3fn\[[^\]]*\][^ ]* transpose\(",
                                 text))
  f8_dots = len(re.findall(r"dot\([^)]*f8e4m3fn", text))
  result = dict(backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind),
                scaling=args.scaling, custom_calls=counts,
                fp8_gemms=counts.get("__cublas$lt$matmul$f8", 0),
                f8_transposes=f8_transposes, unrewritten_f8_dots=f8_dots)
  # Per layer and step: 7 forward products, 7 input gradients, and the
  # forward products `remat="mlp"` recomputes; all inside one scan body.
  print(json.dumps(result, indent=1))
  print("JSON " + json.dumps(result))


if __name__ == "__main__":
  main()
