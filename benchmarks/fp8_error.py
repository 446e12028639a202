"""FP8 base weights: relative RMS error of kernels and products vs bf16.

Weights N(0, 0.02^2) of shape (in, out); activations N(0, 1) rows of `in`
features, plain and with outlier features (1% of features 30x larger, as in
LLM hidden states). Each error is ``||approx - exact|| / ||exact||`` against
float64; the bf16 line is what storing the kernel (and running the product)
in bf16 costs, the baseline FP8 replaces. FP8 products are the exact float32
emulation of the GPU path (`jlora._fp8`, ``product="fp8"``). "block 128" is
a NumPy-only variant with one scale per 128 input values per output channel,
to see whether per-block scales would help.

  PYTHONPATH=. python benchmarks/fp8_error.py [--in 4096 --out 4096 --rows 2048]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora import _fp8


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def block_quantized(w: np.ndarray, block: int) -> np.ndarray:
  """Dequantized e4m3 with a power-of-two scale per (block of in, out)."""
  n_in, n_out = w.shape
  wb = w.reshape(n_in // block, block, n_out)
  amax = np.abs(wb).max(axis=1, keepdims=True)
  s = np.asarray(_fp8.pow2_scale(jnp.asarray(amax, jnp.float32)), np.float64)
  q = np.clip(wb / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return (q.astype(np.float64) * s).reshape(n_in, n_out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--in", dest="n_in", type=int, default=4096)
  p.add_argument("--out", dest="n_out", type=int, default=4096)
  p.add_argument("--rows", type=int, default=2048)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  k1, k2, k3 = jax.random.split(jax.random.key(args.seed), 3)
  w32 = 0.02 * jax.random.normal(k1, (args.n_in, args.n_out), jnp.float32)
  x = jax.random.normal(k2, (args.rows, args.n_in), jnp.float32)
  outliers = jax.random.uniform(k3, (args.n_in,)) < 0.01
  x_out = jnp.where(outliers, 30.0, 1.0) * x
  w64 = np.asarray(w32, np.float64)

  kernels = {"bf16": np.asarray(w32.astype(jnp.bfloat16), np.float64)}
  fp8 = {}
  for scaling in ("channel", "tensor"):
    q = _fp8.quantize_array(w32, "io", scaling=scaling, dtype=jnp.float32,
                            product="fp8")
    fp8[scaling] = q
    kernels[f"fp8 {scaling}"] = np.asarray(q.dequantize(), np.float64)
  kernels["fp8 block 128 (NumPy)"] = block_quantized(w64, 128)

  rows = []
  for name, dense in kernels.items():
    rows.append(dict(what="kernel", system=name, rel_rms=rel(dense, w64)))

  product = jax.jit(lambda q, x: _fp8.dot_general(
      x, q, True, dict(dimension_numbers=(((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32), None))
  bf16_product = jax.jit(lambda w, x: jnp.dot(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
      preferred_element_type=jnp.float32))
  for label, xs in (("N(0,1) rows", x), ("rows with 1% outlier features",
                                          x_out)):
    exact = np.asarray(xs, np.float64) @ w64
    rows.append(dict(what=f"product, {label}", system="bf16 x bf16",
                     rel_rms=rel(bf16_product(w32, xs), exact)))
    for scaling, q in fp8.items():
      rows.append(dict(what=f"product, {label}", system=f"fp8 {scaling}",
                       rel_rms=rel(product(q, xs), exact)))
    # Against the bf16 product (what the FP8 base replaces).
    ref = np.asarray(bf16_product(w32, xs), np.float64)
    for scaling, q in fp8.items():
      rows.append(dict(what=f"product vs bf16, {label}",
                       system=f"fp8 {scaling}",
                       rel_rms=rel(product(q, xs), ref)))

  print(f"weights N(0, 0.02^2) ({args.n_in}, {args.n_out}); {args.rows}"
        " activation rows; relative RMS error vs float64 (or vs bf16)")
  print(f"{'what':<46}{'system':<24}{'rel RMS':>10}")
  for r in rows:
    print(f"{r['what']:<46}{r['system']:<24}{r['rel_rms']:>9.3%}")
  print("JSON " + json.dumps(dict(shape=[args.n_in, args.n_out],
                                  rows=args.rows, results=rows)))


if __name__ == "__main__":
  main()
