"""QLoRA in pure JAX: 4-bit NF4/FP4 (or 8-bit) frozen bases under LoRA.

`quantize` replaces kernels of a params tree by `QuantizedArray` nodes;
`jlora.apply` puts adapters on them, `jlora.wrap` trains the adapters with
each product dequantizing its kernel at the point of use (inside a scan, one
layer's slice at a time), and `jlora.merge` gives fused params in the compute
dtype. `merge_and_quantize` fuses and re-quantizes; `quantizer` quantizes
while loading; `host_offloaded` keeps optimizer state in host memory.

Examples:
  >>> qparams = jlora.quantize(params, "nf4")          # double quant, bf16
  >>> lp = jlora.apply(qparams, rank=16, key=jax.random.key(0))
  >>> trainable, frozen = jlora.partition(lp)
  >>> logits = jlora.wrap(model.apply)({"params": lp}, ids)

References:
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jlora import _fp8, _paths
from jlora._fp8 import Fp8Array, is_fp8
from jlora._quant_array import (BLOCK_SIZE2, DYNAMIC_VALUES, FP4_VALUES,
                                METHODS, NF4_VALUES, QuantizedArray,
                                _check_args, is_quantized, quantize_array)
from jlora.node import default_layout, is_lora
from jlora.layouts import select_targets
from jlora.targets import (ALL_LINEAR, NON_KERNEL_NAMES, Selector, is_matrix,
                           matcher, pattern_value)

__all__ = [
    "BLOCK_SIZE2", "DYNAMIC_VALUES", "FP4_VALUES", "METHODS", "NF4_VALUES",
    "QuantizedArray", "dequantize", "host_offloaded", "is_quantized",
    "merge_and_quantize", "quantize", "quantize_array", "quantize_leaf",
    "quantizer", "Fp8Array", "is_fp8", "quantize_fp8", "set_fp8_product",
]


def _stacked_axes(path: str, leaf: Any, layout: dict[str, str] | None) -> int:
  """Leading 'b' axes of the leaf's layout (default: all but the last two)."""
  roles = pattern_value(path, layout, None) or default_layout(len(leaf.shape))
  if len(roles) != len(leaf.shape):
    raise ValueError(
        f"layout '{roles}' for '{path}' has {len(roles)} letters but the"
        f" kernel has shape {tuple(leaf.shape)}; give one letter per axis")
  return len(roles) - len(roles.lstrip("b"))


def quantize(params: Any, method: str = "nf4", *, block_size: int = 64,
             double_quant: bool = True, targets: Selector = None,
             exclude: Selector = None, compute_dtype: Any = jnp.bfloat16,
             layout: dict[str, str] | None = None) -> Any:
  """Returns `params` with each targeted kernel as a `QuantizedArray`.

  Each kernel slice (one index of its leading stacked axes, e.g. one layer
  of a scanned (L, in, out) kernel) is flattened row-major and cut into
  blocks of ``block_size``; every block stores ``absmax = max|w|`` and, per
  value, the code of the nearest table entry to ``w / absmax``:

  - ``"nf4"``: QLoRA's 4-bit NormalFloat, 16 quantiles of N(0, 1) in [-1, 1]
    (`NF4_VALUES`, the paper's and bitsandbytes' values). On Gaussian
    weights with blocks of 64 the relative RMS error
    ``||dequantize(q) - w|| / ||w||`` is 9.20% (9.21% with double
    quantization), against 12.2% for ``"fp4"`` and 0.59% (0.63%) for
    ``"int8"`` (measured on 4096 x 4096 N(0, 0.02^2) weights).
  - ``"fp4"``: bitsandbytes' 4-bit float (sign, 2 exponent bits, 1 mantissa
    bit; `FP4_VALUES`).
  - ``"int8"``: linear ``round(127 * w / absmax)``, one int8 per value.
  - ``"fp8"``: float8 e4m3 with a power-of-two scale per output channel,
    multiplied in FP8 under `jlora.wrap` on GPUs that have it (an `Fp8Array`;
    see `quantize_fp8` for its options; ``block_size`` and ``double_quant``
    do not apply).

  4-bit codes are packed two per byte. With ``double_quant`` the float32
  block scales are quantized again (QLoRA's double quantization, as
  bitsandbytes does it): minus their mean (``offset``), in blocks of 256, to
  8-bit codes of bitsandbytes' signed dynamic map with a float32 scale per
  block, cutting the scales' cost from 0.5 to about 0.127 bits per
  parameter. NF4 with double quantization stores about 4.13 bits per
  parameter.

  Args:
    params: a params pytree (arrays may be sharded: the stored arrays take
      the kernel's sharding on every axis the mesh divides).
    method: ``"nf4"``, ``"fp4"`` or ``"int8"``.
    block_size: values per absmax block (even; 64 as in QLoRA).
    double_quant: quantize the block scales too.
    targets, exclude: as in `jlora.apply`; default ``"all-linear"`` (every
      ``kernel`` with ndim >= 2 except an output head).
    compute_dtype: the dtype the kernel dequantizes to and reports as its
      ``dtype``.
    layout: ``{regex: roles}`` as in `jlora.apply`; blocks never cross the
      leading stacked ('b') axes, so a scan can slice the stored arrays.
      Default: every axis but the last two is stacked. The `Layouts` from
      `jlora.infer_layout` also sets the default targets, as in `apply`:
      every matmul weight it found but heads and embeddings.

  Non-finite kernels: `quantize` raises a ValueError naming the kernel and
  the number of inf/NaN values when the params are concrete arrays; traced
  (under `jit`) it cannot, and saturates each such value within its own
  block (``+-inf`` to the block's largest finite magnitude, NaN to 0) so no
  other value is affected (see `jlora._quant_array`).

  Returns:
    The same tree with targeted kernels replaced; already quantized kernels
    are left as they are if they match the settings asked for (else a
    ValueError: a kernel is never quantized twice). Integer and bool leaves
    are not kernels for ``"all-linear"`` and stay as they are; an explicit
    target that selects one raises. Give `jlora.apply` the same targets: under
    `jlora.wrap` a quantized kernel is used (dequantized per product)
    through its adapter, and `apply` refuses a quantized kernel it does not
    adapt. `dequantize` gives a plain tree for running without adapters.

  Examples:
    >>> qparams = jlora.quantize(params, "nf4", targets="proj")
    >>> jlora.dequantize(qparams)["dense"]["kernel"].dtype
    dtype(bfloat16)
  """
  if method == "fp8":
    _fp8_only(block_size, double_quant)
    return quantize_fp8(params, targets=targets, exclude=exclude,
                        compute_dtype=compute_dtype, layout=layout)
  leaves = _paths.leaves_with_path(params)
  adapted = [p for p, x in leaves if is_lora(x)]
  if adapted:
    raise ValueError(
        f"params already hold LoRA adapters at {adapted[:5]}; quantize the"
        " base before jlora.apply, or use jlora.quant.merge_and_quantize to"
        " fuse and re-quantize")
  chosen = set(select_targets(leaves, targets, exclude, layout))

  def replace(path, leaf):
    if path not in chosen:
      return leaf
    stacked = _stacked_axes(path, leaf, layout)
    if is_quantized(leaf):
      _check_same_settings(path, leaf, method, block_size, double_quant,
                           compute_dtype, stacked)
      return leaf
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      if _only_all_linear(path, leaf, targets):
        return leaf  # "all-linear" means floating kernels
      _not_floating(path, leaf)
    return quantize_array(leaf, method, block_size=block_size,
                          double_quant=double_quant, dtype=compute_dtype,
                          stacked=stacked, name=path)

  return _paths.map_with_path(replace, params)


def _only_all_linear(path: str, leaf: Any, targets: Selector) -> bool:
  """Whether only the default "all-linear" selector picked this leaf."""
  return not any(s != ALL_LINEAR and matcher(s)(path, leaf)
                 for s in _selectors(targets))


def _not_floating(path: str, leaf: Any):
  raise ValueError(
      f"target '{path}' has dtype {jnp.dtype(leaf.dtype).name}; only"
      " floating point kernels can be quantized. Leave it out (exclude=...)"
      " or cast it to a float dtype first")


def _check_same_settings(path, leaf, method, block_size, double_quant,
                         compute_dtype, stacked):
  """An already quantized kernel is kept only if asked for as it is."""
  if is_fp8(leaf) or method == "fp8":
    if is_fp8(leaf) and method == "fp8":
      return
    have = "fp8" if is_fp8(leaf) else leaf.method
    raise ValueError(
        f"'{path}' is already quantized with method={have!r} (asked"
        f" {method!r}); it is not quantized twice. Quantize the original"
        " kernel, or jlora.dequantize(tree, jnp.float32) first to re-quantize"
        " on purpose (adding a second rounding error)")
  want = dict(method=method, block_size=block_size,
              double_quant=bool(double_quant),
              compute_dtype=jnp.dtype(compute_dtype), stacked=stacked)
  have = dict(method=leaf.method, block_size=leaf.block_size,
              double_quant=leaf.double_quant,
              compute_dtype=jnp.dtype(leaf.dtype), stacked=leaf.stacked)
  diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
  if diff:
    text = ", ".join(f"{k}={h!r} (asked {w!r})" for k, (h, w) in diff.items())
    raise ValueError(
        f"'{path}' is already quantized with {text}; it is not quantized"
        " twice. Quantize the original kernel, or jlora.dequantize(tree,"
        " jnp.float32) first to re-quantize on purpose (adding a second"
        " rounding error); for another compute dtype only, use"
        " leaf.astype(dtype)")


def dequantize(tree: Any, dtype: Any = None) -> Any:
  """Every `QuantizedArray` (also the base of a `LoRA` node) as an array.

  Examples:
    >>> params = jlora.dequantize(qparams)        # bf16 kernels
  """
  def dense(x):
    if is_quantized(x):
      return x.dequantize(dtype)
    if is_lora(x) and is_quantized(x.w):
      return dataclasses.replace(x, w=x.w.dequantize(dtype))
    return x
  return jax.tree.map(dense, tree, is_leaf=_paths.is_leaf)


def quantize_leaf(name: str, array: Any, method: str = "nf4", *,
                  block_size: int = 64, double_quant: bool = True,
                  targets: Selector = None, exclude: Selector = None,
                  compute_dtype: Any = jnp.bfloat16,
                  layout: dict[str, str] | None = None,
                  **fp8_options) -> Any:
  """One named leaf, quantized if `targets` selects it, else unchanged.

  With ``method="fp8"``, `quantize_fp8`'s ``scaling``, ``product`` and
  ``transposed_copy`` may be given too.

  ``name`` is the '/'-joined Flax path; selection is `quantize`'s, applied to
  this leaf alone (a target that matches nothing here is not an error), and
  so are its errors (inf/NaN values, an explicitly targeted integer leaf).

  Examples:
    >>> quantize_leaf("model/layers/mlp/up_proj/kernel", w).method
    'nf4'
  """
  _check_fp8_options(method, fp8_options)
  if (not is_matrix(array) or name.rsplit("/", 1)[-1] in NON_KERNEL_NAMES):
    return array
  sels = _selectors(targets) or [ALL_LINEAR]
  if not any(matcher(s)(name, array) for s in sels):
    return array
  if any(matcher(s)(name, array) for s in _selectors(exclude)):
    return array
  stacked = _stacked_axes(name, array, layout)
  if is_quantized(array):
    _check_same_settings(name, array, method, block_size, double_quant,
                         compute_dtype, stacked)
    return array
  if not jnp.issubdtype(array.dtype, jnp.floating):
    if _only_all_linear(name, array, targets):
      return array
    _not_floating(name, array)
  if method == "fp8":
    _fp8_only(block_size, double_quant)
    return _fp8.quantize_array(array, _layout_of(name, array, layout),
                               dtype=compute_dtype, path=name, **fp8_options)
  return quantize_array(array, method, block_size=block_size,
                        double_quant=double_quant, dtype=compute_dtype,
                        stacked=stacked, name=name)


_FP8_OPTIONS = ("scaling", "product", "transposed_copy")
_LEAF_OPTIONS = ("block_size", "double_quant", "targets", "exclude",
                 "compute_dtype", "layout")


def _check_fp8_options(method: str, options: dict) -> None:
  given = sorted(k for k in options if k in _FP8_OPTIONS)
  unknown = sorted(set(options) - set(_FP8_OPTIONS))
  if unknown:
    raise TypeError(f"unknown quantization options {unknown}")
  if given and method != "fp8":
    raise TypeError(
        f"{given} given with method {method!r}: scaling, product and"
        " transposed_copy are options of method 'fp8'")
  if method == "fp8":
    _fp8.check_options(options.get("scaling", "channel"),
                       options.get("product", "auto"))


def _selectors(sel: Selector) -> list[Any]:
  if sel is None:
    return []
  if isinstance(sel, (str, re.Pattern)) or callable(sel):
    return [sel]
  return list(sel)


def quantizer(method: str = "nf4", **options) -> Callable[[str, Any], Any]:
  """A per-tensor hook ``(name, array) -> array | QuantizedArray`` for loaders.

  Takes `quantize_leaf`'s keyword options. A loader that calls it on each
  parameter as soon as it is placed on device holds one dense parameter at a
  time, never the whole dense model.

  Examples:
    >>> hook = jlora.quant.quantizer("nf4")
    >>> params = {p: hook(p, read(p)) for p in names}
    >>> model, params = from_config(cfg, key, scan_layers=True,
    ...     quantize=jlora.quant.quantizer("fp8", transposed_copy=True))
  """
  if method == "fp8":
    _fp8_only(options.get("block_size", 64), options.get("double_quant", True))
  else:
    _check_args(method, options.get("block_size", 64))
  _check_fp8_options(method, {k: v for k, v in options.items()
                              if k not in _LEAF_OPTIONS})
  return functools.partial(_hook, method=method, options=options)



def _hook(name, array, *, method, options):
  return quantize_leaf(name, array, method, **options)


def merge_and_quantize(tree: Any, method: str | None = None, *,
                       block_size: int | None = None,
                       double_quant: bool | None = None,
                       compute_dtype: Any = None) -> Any:
  """Fuses every `LoRA` node and quantizes the result again.

  A node on a quantized base is re-quantized with its base's settings
  (method, block size, double quantization, compute dtype, stacked axes)
  unless overridden; a node on a dense base is quantized only when `method`
  is given (its stacked axes from its layout). The fused kernel is
  ``w + scale * a @ b`` in the compute dtype, so the result carries the
  quantization error of the merged kernel, not of the old base.

  Examples:
    >>> deployed = jlora.quant.merge_and_quantize(lp)    # NF4 again
  """
  def fuse(node):
    if not is_lora(node):
      return node
    fused = node.materialize()
    w = node.w
    if method == "fp8" or (method is None and is_fp8(w)):
      _fp8_only(block_size or 64, True if double_quant is None else
                double_quant)
      opts = (dict(scaling=w.scaling, product=w.product,
                   transposed_copy=w.values_t is not None) if is_fp8(w) else
              {})
      return _fp8.quantize_array(fused, node.layout, path=node.path,
                                 dtype=compute_dtype or fused.dtype, **opts)
    if is_fp8(w):  # to another method: as from a dense base
      w = fused
    if is_quantized(w):
      return quantize_array(
          fused, method or w.method,
          block_size=w.block_size if block_size is None else block_size,
          double_quant=w.double_quant if double_quant is None else
          double_quant, dtype=compute_dtype or w.dtype, stacked=w.stacked,
          name=node.path)
    if method is None:
      return fused
    stacked = len(node.layout) - len(node.layout.lstrip("b"))
    return quantize_array(
        fused, method, block_size=64 if block_size is None else block_size,
        double_quant=True if double_quant is None else double_quant,
        dtype=compute_dtype or fused.dtype, stacked=stacked, name=node.path)

  return jax.tree.map(fuse, tree, is_leaf=_paths.is_leaf)


def _to_memory(tree: Any, space) -> Any:
  # Scalars (step counts) stay where they are: moving one would pin it to a
  # single device, and they cost nothing.
  return jax.tree.map(
      lambda x: jax.device_put(x, space)
      if isinstance(x, jax.Array) and x.ndim else x, tree)


def host_offloaded(tx: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
  """`tx` with its state kept in host memory (JAX memory kind pinned_host).

  ``init`` returns the state in host memory; ``update`` brings it to the
  device, runs ``tx.update`` and sends the new state back, so inside a
  jitted step the optimizer state occupies device memory only during the
  update, after the backward pass has freed its activations. Adam's two
  moments of the adapters then never add to the forward/backward peak.
  Each array keeps its sharding; scalars (step counts) stay on the device.
  Needs a backend with host memory spaces (GPU and TPU; CPU as well in
  recent JAX).

  Examples:
    >>> tx = jlora.quant.host_offloaded(optax.adamw(1e-4))
    >>> opt_state = tx.init(trainable)    # lives in pinned host memory
  """
  Space = jax.memory.Space

  def init(params):
    return _to_memory(tx.init(params), Space.Host)

  def update(updates, state, params=None, **extra):
    state = _to_memory(state, Space.Device)
    updates, state = tx.update(updates, state, params, **extra)
    return updates, _to_memory(state, Space.Host)

  return optax.GradientTransformation(init, update)


# -- FP8 ------------------------------------------------------------------------

def _fp8_only(block_size, double_quant) -> None:
  if block_size != 64 or double_quant is not True:
    raise ValueError(
        f"block_size={block_size!r} and double_quant={double_quant!r} apply to"
        " nf4/fp4/int8; 'fp8' keeps one power-of-two scale per output channel"
        " (or per tensor: jlora.quant.quantize_fp8(..., scaling='tensor'))")


def _layout_of(path: str, leaf: Any, layout: dict[str, str] | None) -> str:
  roles = pattern_value(path, layout, None) or default_layout(len(leaf.shape))
  if len(roles) != len(leaf.shape):
    raise ValueError(
        f"layout '{roles}' for '{path}' has {len(roles)} letters but the"
        f" kernel has shape {tuple(leaf.shape)}; give one letter per axis")
  return roles


def quantize_fp8(params: Any, *, scaling: str = "channel",
                 product: str = "auto", targets: Selector = None,
                 exclude: Selector = None, compute_dtype: Any = jnp.bfloat16,
                 layout: dict[str, str] | None = None,
                 transposed_copy: bool = False) -> Any:
  """Returns `params` with each targeted kernel as an FP8 `Fp8Array`.

  Each value is ``round_e4m3(w / s)`` (float8 e4m3: 3 mantissa bits, finite
  range +-448), with ``s`` the power of two that brings the largest ``|w|``
  it covers into (224, 448]. On 4096 x 4096 N(0, 0.02^2) weights the
  relative RMS error ``||dequantize(q) - w|| / ||w||`` is 2.65% (bf16's
  rounding: 0.17%), the same for both scalings (a power-of-two scale only
  shifts exponents), and that of a product with N(0, 1) activations 3.76%
  against the bf16 product (benchmarks/fp8_error.py). Under `jlora.wrap` the
  products with these
  kernels quantize their activations the same way on the fly and run as
  FP8 GEMMs on GPUs that have them (see `jlora._fp8`), with or without an
  adapter; the backward pass gives activations their gradient through the
  same FP8 kernel. ``jlora.merge`` and `dequantize` give the compute dtype.

  Args:
    params: a params pytree (arrays may be sharded: ``values`` keeps the
      kernel's sharding, ``scale`` its sharding on the axes it keeps).
    scaling: ``"channel"``: one scale per output channel (per stacked index
      and output index), activations scaled per row; ``"tensor"``: one scale
      per kernel (per stacked index), activations per tensor, which XLA can
      fuse whole into the GPU's FP8 GEMM.
    product: ``"auto"`` (FP8 on NVIDIA GPUs of compute capability >= 8.9,
      dequantize-per-use elsewhere), ``"fp8"`` (FP8 numerics everywhere,
      emulated exactly in float32 where the hardware has none) or
      ``"upcast"`` (always dequantize per use). `set_fp8_product` changes it.
    targets, exclude, layout: as in `quantize` (default "all-linear", or an
      inferred `Layouts`' weights; the layout's 'i' axes are the input axes
      the scales are shared along).
    compute_dtype: the dtype the kernel dequantizes to and reports.
    transposed_copy: also store each kernel's values in the other GEMM
      order (``Fp8Array.values_t``: input axes last, or output axes last
      for a kernel that has its input axes last already). A GPU's FP8 GEMM
      reads both operands with the contracted axes last; the forward
      product contracts the input axes and the backward the output axes, so
      with one order stored XLA transposes the kernel for one of them every
      step. The copy costs
      the e4m3 values' size again (a bf16 kernel's size in all). On an H200
      it made an 8B LoRA step 4% faster (1.32x bf16's tokens/s against
      1.27x without) at the same peak memory, since XLA otherwise keeps a
      transposed copy for the step (benchmarks/RESULTS.md).

  Raises:
    ValueError: a kernel holds NaN or inf values (naming its path), or an
      unknown ``scaling``/``product``.

  Examples:
    >>> qparams = jlora.quant.quantize_fp8(params, scaling="tensor")
    >>> lp = jlora.apply(qparams, rank=16, key=jax.random.key(0))
    >>> logits = jlora.wrap(model.apply)({"params": lp}, ids)
  """
  _fp8.check_options(scaling, product)
  leaves = _paths.leaves_with_path(params)
  adapted = [p for p, x in leaves if is_lora(x)]
  if adapted:
    raise ValueError(
        f"params already hold LoRA adapters at {adapted[:5]}; quantize the"
        " base before jlora.apply, or use jlora.quant.merge_and_quantize(tree,"
        " 'fp8') to fuse and re-quantize")
  chosen = set(select_targets(leaves, targets, exclude, layout))

  def replace(path, leaf):
    if path not in chosen or is_quantized(leaf) or not jnp.issubdtype(
        leaf.dtype, jnp.floating):
      return leaf
    return _fp8.quantize_array(leaf, _layout_of(path, leaf, layout),
                               scaling=scaling, dtype=compute_dtype,
                               product=product,
                               transposed_copy=transposed_copy, path=path)

  return _paths.map_with_path(replace, params)


def set_fp8_product(tree: Any, product: str) -> Any:
  """Every `Fp8Array` of `tree` (LoRA bases too) with another ``product``.

  ``"fp8"`` runs the FP8 numerics on any backend (exact float32 emulation
  where the hardware has no FP8), e.g. to test the GPU path on a CPU.

  Examples:
    >>> emulated = jlora.quant.set_fp8_product(lp, "fp8")
  """
  _fp8.check_options("channel", product)

  def switch(x):
    if is_fp8(x):
      return dataclasses.replace(x, product=product)
    if is_lora(x) and is_fp8(x.w):
      return dataclasses.replace(x, w=dataclasses.replace(x.w,
                                                          product=product))
    return x
  return jax.tree.map(switch, tree, is_leaf=_paths.is_leaf)
