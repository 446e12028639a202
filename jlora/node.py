"""The `LoRA` pytree node: a frozen kernel plus a trainable low-rank update."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

_ROLES = frozenset("bio")


def default_layout(ndim: int) -> str:
  """Layout of a kernel whose last two axes are (in, out), leading axes stacked.

  >>> default_layout(3)
  'bio'
  """
  if ndim < 2:
    raise ValueError(f"a LoRA kernel needs at least 2 axes, got {ndim}")
  return "b" * (ndim - 2) + "io"


def check_layout(layout: str, shape: tuple[int, ...], path: str = "") -> None:
  """Raises ValueError unless `layout` is a valid role string for `shape`."""
  where = f" for '{path}'" if path else ""
  if len(layout) != len(shape):
    raise ValueError(
        f"layout '{layout}'{where} has {len(layout)} letters but the kernel has"
        f" shape {tuple(shape)} ({len(shape)} axes); give one letter per axis:"
        " 'b' stacked/batch, 'i' input (contracted), 'o' output")
  if set(layout) - _ROLES:
    raise ValueError(
        f"layout '{layout}'{where} may only use the letters 'b' (stacked axis),"
        " 'i' (input axis) and 'o' (output axis)")
  if "i" not in layout or "o" not in layout:
    raise ValueError(
        f"layout '{layout}'{where} needs at least one input axis 'i' and one"
        " output axis 'o'")


def factor_shapes(layout: str, shape: tuple[int, ...]):
  """Returns (batch_shape, in_size, out_size) of a kernel under `layout`."""
  batch = tuple(s for s, r in zip(shape, layout) if r == "b")
  fan_in = math.prod(s for s, r in zip(shape, layout) if r == "i")
  fan_out = math.prod(s for s, r in zip(shape, layout) if r == "o")
  return batch, fan_in, fan_out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
  """A kernel with a low-rank adapter: ``W' = w + scale * a @ b``.

  Replaces a kernel leaf in a params tree. ``w`` is the frozen base kernel,
  untouched; ``a`` and ``b`` are the trainable factors. With ``layout`` giving
  each kernel axis a role ('b' stacked, 'i' input, 'o' output), and
  ``in = prod(input axes)``, ``out = prod(output axes)``:

  - ``w``: the kernel, any shape, e.g. (in, out) or (layers, in, out).
  - ``a``: (*stacked, in, r), initialised at random (see `jlora.apply`).
  - ``b``: (*stacked, r, out), initialised at zero, so training starts from
    the base model and ``merge(apply(params)) == params`` bit for bit.
  - ``alpha`` (static): ``scale = alpha / r`` (``alpha / sqrt(r)`` when
    ``rslora``).
  - ``e`` (optional): (*stacked, r) per-rank gains, the update becoming
    ``a @ diag(e) @ b`` (AdaLoRA's singular values; masked ranks are zero).
  - ``m`` (optional): (*stacked, out) DoRA magnitude; the fused kernel is
    ``m * W' / ||W'||`` with the norm per output column, taken as a constant
    in the backward pass.
  - ``dropout`` (static): dropout rate on the adapter path's input, active
    when the wrapped call is given ``lora_rng`` (see `jlora.wrap`).
  - ``train_a`` (static): False freezes ``a`` after init (LoRA-FA):
    `jlora.partition` then puts it in the frozen half.

  Any of ``w``, ``a``, ``b`` may be ``None`` in a partitioned half (see
  `jlora.partition`).

  Example:
    >>> node = jlora.apply({"kernel": w}, rank=4, key=key)["kernel"]
    >>> node.rank, node.scale
    (4, 2.0)

  References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  """

  w: Array
  a: Array
  b: Array
  e: Array = None
  m: Array = None
  alpha: float = dataclasses.field(metadata=dict(static=True), default=1.0)
  layout: str = dataclasses.field(metadata=dict(static=True), default="io")
  rslora: bool = dataclasses.field(metadata=dict(static=True), default=False)
  path: str = dataclasses.field(metadata=dict(static=True), default="")
  dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)
  train_a: bool = dataclasses.field(metadata=dict(static=True), default=True)

  @property
  def rank(self) -> int:
    ref = self.a if self.a is not None else self.b
    if ref is None:
      raise ValueError(f"LoRA node '{self.path}' holds no adapter arrays")
    return int(ref.shape[-1] if ref is self.a else ref.shape[-2])

  @property
  def scale(self) -> float:
    r = self.rank
    return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  def check_complete(self) -> "LoRA":
    """Raises ValueError if this node is one half of a `partition`."""
    if self.a is None or self.b is None or self.w is None:
      raise ValueError(
          f"LoRA node '{self.path}' is one half of a partition (w, a or b is"
          " None); pass jlora.combine(trainable, frozen) instead")
    return self

  def check_arrays(self) -> "LoRA":
    """Raises ValueError unless the node's arrays are floating point and
    their shapes fit ``w`` and ``layout``; returns the node.

    An integer or bool base would truncate ``w + scale * a @ b`` (or cast
    the factors to integers, losing the adapter): LoRA is defined on
    floating-point kernels only. Fields that are None (a partition half)
    are skipped.
    """
    for name in ("w", "a", "b", "e", "m"):
      x = getattr(self, name)
      dtype = getattr(x, "dtype", None)
      if x is not None and dtype is not None and not jnp.issubdtype(
          dtype, jnp.floating):
        raise ValueError(
            f"LoRA node '{self.path}' has {name} of dtype {jnp.dtype(dtype)};"
            " LoRA needs floating-point arrays throughout. Cast the kernel"
            f" and factors to a float dtype (e.g. {name}.astype(jnp.float32))"
            " or leave an integer/bool kernel without an adapter")
    if self.w is None or not hasattr(self.w, "shape"):
      return self
    check_layout(self.layout, self.shape, self.path)
    stacked, fan_in, fan_out = factor_shapes(self.layout, self.shape)
    lead = (len(self.names),) if isinstance(self, MultiLoRA) else ()
    ref = self.a if self.a is not None else self.b
    r = None if ref is None else self.rank
    want = {"a": (*lead, *stacked, fan_in, r), "b": (*lead, *stacked, r, fan_out),
            "e": (*stacked, r), "m": (*stacked, fan_out)}
    for name, shape in want.items():
      x = getattr(self, name)
      if x is not None and hasattr(x, "shape") and tuple(x.shape) != shape:
        raise ValueError(
            f"LoRA node '{self.path}' has {name} of shape {tuple(x.shape)},"
            f" but its kernel {self.shape} with layout '{self.layout}' needs"
            f" {shape} (rank {r}); the arrays come from different kernels or"
            " ranks")
    return self

  def delta(self, dtype=None) -> Array:
    """``scale * a @ b`` laid out like ``w`` (forms the full matrix)."""
    self.check_complete().check_arrays()
    b = self.b if self.e is None else self.e[..., :, None] * self.b
    ab = jnp.einsum("...ir,...ro->...io", self.a, b,
                    precision=jax.lax.Precision.HIGHEST)
    ab = ab * jnp.asarray(self.scale, ab.dtype)
    return _to_kernel_layout(ab, self.layout, self.shape).astype(
        dtype or ab.dtype)

  def materialize(self) -> Array:
    """The fused kernel ``w + scale * a @ b`` in ``w``'s dtype.

    With a DoRA magnitude ``m``: ``m * W' / ||W'||``, norms per output.
    """
    w = base_array(self.check_complete().check_arrays().w)
    acc = jnp.promote_types(w.dtype, jnp.float32)
    fused = w.astype(acc) + self.delta(acc)
    if self.m is not None:
      fused = fused * self.column_gain(fused)
    return fused.astype(w.dtype)

  def column_gain(self, fused: Array) -> Array:
    """DoRA's ``m / ||W'||`` broadcast against the kernel (norm detached)."""
    axes = tuple(k for k, r in enumerate(self.layout) if r == "i")
    norm = jnp.sqrt(jnp.sum(jnp.square(fused.astype(jnp.float32)), axis=axes,
                            keepdims=True))
    norm = jax.lax.stop_gradient(norm)
    m = _to_kernel_layout(self.m[..., None, :].astype(jnp.float32),
                          self.layout, tuple(norm.shape))
    return (m / norm).astype(fused.dtype)


def kernel_matrix(w: Array, layout: str) -> Array:
  """The kernel viewed as (*stacked, in, out), axes grouped by role."""
  order = ([k for k, r in enumerate(layout) if r == "b"] +
           [k for k, r in enumerate(layout) if r == "i"] +
           [k for k, r in enumerate(layout) if r == "o"])
  stacked, fan_in, fan_out = factor_shapes(layout, tuple(w.shape))
  return jnp.transpose(w, order).reshape(*stacked, fan_in, fan_out)


def _to_kernel_layout(ab: Array, layout: str, shape) -> Array:
  """(*stacked, in, out) -> the kernel's own axis order and shape."""
  order = ([k for k, r in enumerate(layout) if r == "b"] +
           [k for k, r in enumerate(layout) if r == "i"] +
           [k for k, r in enumerate(layout) if r == "o"])
  ab = ab.reshape(tuple(shape[k] for k in order))
  return jnp.transpose(ab, np.argsort(order))


def base_array(w: Array) -> Array:
  """The base kernel as a plain array (dequantizing a quantized base)."""
  dequantize = getattr(w, "dequantize", None)
  return dequantize() if callable(dequantize) else w


def is_lora(x: Any) -> bool:
  return isinstance(x, LoRA)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoRA(LoRA):
  """One kernel with several adapters stacked, for mixed-adapter batches.

  Made by `jlora.stack_adapters`; under ``jlora.wrap(fn)(..., adapter_ids=ids)``
  example ``k`` of the batch runs adapter ``ids[k]``. With ``n`` adapters and
  ``r`` the largest of their ranks (smaller ranks are zero-padded, which
  changes neither outputs nor gradients):

  - ``a``: (n, *stacked, in, r); ``b``: (n, *stacked, r, out).
  - ``names``, ``ranks``, ``alphas``, ``rsloras`` (static): per adapter, in
    stacking order; rank 0 marks an adapter that does not adapt this kernel
    (its factors are zero). ``scales`` are each adapter's own scale.

  It is a `LoRA` node, so `partition`, `mask`, `optimizer` and `count` treat
  ``a`` and ``b`` as trainable; there is no single fused kernel, so `merge`
  and file formats need one adapter first (`jlora.unstack_adapters`).

  Example:
    >>> stacked = jlora.stack_adapters(adapter_set)       # MultiLoRA nodes
    >>> y = jlora.wrap(model.apply)({"params": stacked}, x, adapter_ids=ids)
  """

  names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True),
                                             default=())
  ranks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True),
                                             default=())
  alphas: tuple[float, ...] = dataclasses.field(metadata=dict(static=True),
                                                default=())
  rsloras: tuple[bool, ...] = dataclasses.field(metadata=dict(static=True),
                                                default=())

  @property
  def scales(self) -> tuple[float, ...]:
    """Each adapter's scale; 0 for one that does not adapt this kernel."""
    return tuple(
        0.0 if r == 0 else (al / math.sqrt(r) if rs else al / r)
        for r, al, rs in zip(self.ranks, self.alphas, self.rsloras))

  @property
  def scale(self) -> float:
    raise TypeError(
        f"MultiLoRA node '{self.path}' holds {len(self.names)} adapters with"
        f" scales {self.scales}; pick one with jlora.unstack_adapters")

  def delta(self, dtype=None) -> Array:
    raise TypeError(
        f"MultiLoRA node '{self.path}' holds adapters {list(self.names)} and no"
        " single fused kernel; run it with jlora.wrap(fn)(...,"
        " adapter_ids=ids), or take one adapter with"
        " jlora.unstack_adapters(tree) before merging or saving")


def is_multi(x: Any) -> bool:
  return isinstance(x, MultiLoRA)


def check_single(node: LoRA, what: str) -> None:
  """Raises TypeError for a `MultiLoRA` node, which `what` cannot take."""
  if is_multi(node):
    raise TypeError(
        f"{what} takes single adapters, but '{node.path}' stacks"
        f" {list(node.names)}; split them with jlora.unstack_adapters(tree)"
        " and pass one")
