"""`wrap`: call any function of the params with LoRA kernels kept factored."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import checkify

from jlora import _grouped_gemm
from jlora._factored import AdapterIds, Factored, collect_layout_errors
from jlora._fp8 import is_fp8
from jlora._fp8_kernel import Fp8Kernel
from jlora._interpreter import eval_jaxpr
from jlora._paths import is_leaf
from jlora._quant_array import is_quantized
from jlora.inject import check_key
from jlora.node import is_lora, is_multi


def _is_dynamic(x: Any) -> bool:
  return is_leaf(x) or isinstance(x, (jax.Array, np.ndarray, np.generic))


def _abstract(x: Any) -> Any:
  if is_lora(x):
    x.check_complete().check_arrays()
  if is_leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _input(x: Any, rng, ids) -> Any:
  if is_lora(x):
    return Factored.from_node(x, rng, ids)
  if is_fp8(x):  # frozen, its products still in FP8
    return Fp8Kernel(jax.lax.stop_gradient(x))
  # A quantized kernel without an adapter is frozen: dequantize it once.
  return x.dequantize() if is_quantized(x) else x


def _node_rng(rng, index: int):
  return None if rng is None else jax.random.fold_in(rng, index)


def _check_axis(axis: Any) -> None:
  if axis is not None and (isinstance(axis, (bool, np.bool_)) or
                           not isinstance(axis, (int, np.integer))):
    raise TypeError(
        f"adapter_ids_axis must be an int (the batch axis of the adapted"
        f" products' inputs) or None, got {axis!r}")


def _check_ids(ids: Any, nodes: list, axis: Any) -> AdapterIds:
  if not nodes:
    raise ValueError(
        "adapter_ids was given but the arguments hold no stacked adapters;"
        " build them with jlora.stack_adapters(adapter_set)")
  traced = isinstance(ids, jax.core.Tracer)
  checked = ids if traced else np.asarray(ids)
  if checked.ndim != 1 or not np.issubdtype(checked.dtype, np.integer):
    raise ValueError(
        f"adapter_ids must be a 1-D integer array (one adapter index per"
        f" example), got shape {checked.shape} and dtype {checked.dtype}")
  if checked.shape[0] == 0:
    raise ValueError("adapter_ids is empty; give one adapter index per"
                     " example of the batch")
  n = min(len(x.names) for x in nodes)
  valid = (f"the stacked adapters are {list(nodes[0].names)}: indices"
           f" 0..{n - 1}, and -1 runs the bare base")
  if not traced:
    bad = checked[(checked < -1) | (checked >= n)]
    if bad.size:
      raise ValueError(
          f"adapter_ids holds index {int(bad[0])} (at position"
          f" {int(np.argmax((checked < -1) | (checked >= n)))}), but {valid}")
  else:
    # Values are unknown while tracing: under checkify the check reports
    # them; without it their examples' outputs are NaN (see `wrap`).
    ids = jax.numpy.asarray(ids)
    checkify.debug_check(
        jax.numpy.all((ids >= -1) & (ids < n)),
        "adapter_ids holds {bad}, out of range: " + valid.replace(
            "{", "{{").replace("}", "}}"),
        bad=ids[jax.numpy.argmax((ids < -1) | (ids >= n))])
  return AdapterIds(jax.numpy.asarray(ids),
                    None if axis is None else int(axis))


def wrap(fn: Callable[..., Any], *, share_inputs: bool = True,
         adapter_ids_axis: int | None = None) -> Callable[..., Any]:
  """Makes `fn` LoRA-aware: same signature, kernels given as `LoRA` nodes.

  Inside the returned function every matrix product against a LoRA kernel is
  computed factored, ``x @ w + scale * ((x @ a) @ b)``: the (in, out) update
  ``a @ b`` is never formed and the frozen ``w`` gets no gradient, so its
  weight gradient is never computed. Selecting experts (slices) of a stacked
  kernel, by indexing, gathers or ``lax.ragged_dot``, selects the factors
  alike (see `jlora._expert_rules`). Any other use of the kernel (an
  elementwise op) sees the fused ``w + scale * a @ b``. Works
  through `jit`, `jax.checkpoint`, `lax.scan` (e.g. `nn.scan` over stacked
  layers) and `custom_vjp` functions inside `fn`, and composes with `jit`,
  `grad` and `vmap` outside it.

  Array arguments (and `LoRA` nodes) are traced; every other argument
  (Python scalars, strings, flags) is passed to `fn` as a constant. A
  quantized kernel (see `jlora.quantize`) is dequantized per use when it has
  an adapter and once at entry when it has none; an FP8 kernel (``"fp8"``)
  runs its products in FP8 either way.

  Adapter dropout (nodes made with ``dropout > 0``) is active only when the
  call is given a PRNG key as the keyword ``lora_rng``; it masks the input of
  the adapter path, never the base product. Without it the call is
  deterministic. Keys: the node that is the ``n``-th array leaf of
  ``(args, kwargs)`` (flattened with `LoRA` nodes as leaves) uses
  ``k = jax.random.fold_in(lora_rng, n)``; a stacked kernel splits it into
  one key per stacked index, ``jax.random.split(k, stacked_shape)``, and
  index ``l``'s mask is ``jax.random.bernoulli(keys[l], 1 - p, shape)`` over
  its product's input without the stacked axes. So each layer of a stack
  has its own mask, whether the stack is scanned over or multiplied
  batch-wise (e.g. ``einsum('lbi,lio->lbo')``), with the same masks either
  way. An expert selected by an index (``w[i]``, ``dynamic_slice``) uses its
  own key ``keys[i]``; experts gathered per row (``w[expert_ids]``, row
  ``t``) use ``jax.random.fold_in(keys[expert_ids[t]], t)`` over that row;
  ``ragged_dot`` draws one mask over all rows from ``keys[0]``. Inside a
  ``shard_map`` (a Mixture-of-Experts block routing each device's tokens
  under `jax.set_mesh`), every key is first folded with the device's index
  along the manual axes.

  Adapters that read the same input with the same contraction (q/k/v
  projections, gate/up) compute their ``x @ a`` as one product against the
  concatenated factors, so the input is read once forward and backward;
  ``share_inputs=False`` gives one product per kernel (same results up to
  float rounding).

  Mixed-adapter batches: with `MultiLoRA` nodes (`jlora.stack_adapters`) in
  the arguments, pass ``adapter_ids`` (B,) ints: example ``k`` runs adapter
  ``ids[k]`` (``-1``: the bare base), all in one batched gather-matmul per
  kernel. Ids must lie in ``-1..n-1`` for ``n`` stacked adapters. Concrete
  ids out of range raise ValueError; under `jit` their values are unknown
  while tracing, so an out-of-range id makes its example's outputs NaN
  (never silently the base's), and the call carries a `checkify` check:
  ``checkify.checkify(jax.jit(f))(..., adapter_ids=ids)`` returns an error
  naming the bad id and the range.

  The batch axis of each adapted product's input is inferred: the one
  uncontracted axis of size B, or failing that the one whose size is a
  multiple of B (a batch-major flattened (B * T, features) input). When two
  axes qualify, e.g. a (B, T, F) input with T == B, the call raises: name
  the axis with ``adapter_ids_axis``, e.g. ``wrap(f, adapter_ids_axis=1)``
  for a time-major (T, B, F) model, or ``-2`` for (..., batch, features)
  inputs at every depth (a scan over time then sees (B, F) per step).

  Args:
    fn: the function, e.g. ``model.apply``.
    share_inputs: share ``x @ a`` across kernels reading the same input.
    adapter_ids_axis: the batch axis of every adapted product's input for
      ``adapter_ids`` (negative counts from the end); None infers it.

  Examples:
    >>> forward = jlora.wrap(model.apply)
    >>> logits = forward({"params": lp}, x)
    >>> grads = jax.grad(lambda t: loss(forward({"params": jlora.combine(t, frozen)}, x)))(trainable)

  Raises:
    LayoutError: kernels are contracted on other axes than their layouts
      say; one error lists them all, with the layouts that fit.
    ValueError: out-of-range or malformed ``adapter_ids``, an ambiguous
      batch axis, a LoRA node with integer arrays.
  """

  _check_axis(adapter_ids_axis)

  @functools.wraps(fn)
  def wrapped(*args, lora_rng: jax.Array | None = None,
              adapter_ids: jax.Array | None = None, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_leaf)
    dynamic = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    if lora_rng is not None:
      check_key(lora_rng, "lora_rng")
    if adapter_ids is not None:
      adapter_ids = _check_ids(adapter_ids, [x for x in leaves if is_multi(x)],
                               adapter_ids_axis)
    if not any(is_leaf(leaves[i]) for i in dynamic):
      return fn(*args, **kwargs)

    def flat_fn(*values):
      full = list(leaves)
      for i, v in zip(dynamic, values):
        full[i] = v
      a, k = jax.tree.unflatten(treedef, full)
      return fn(*a, **k)

    with _grouped_gemm.as_lax_ragged_dot():
      closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
          *[_abstract(leaves[i]) for i in dynamic])
    inputs = [_input(leaves[i], _node_rng(lora_rng, n), adapter_ids)
              for n, i in enumerate(dynamic)]
    with collect_layout_errors():  # one error listing every mismatch
      outs = eval_jaxpr(closed.jaxpr, closed.consts, inputs,
                        fuse_outputs=True, share=share_inputs)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped
