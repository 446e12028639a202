"""Which leaves of a params tree get adapters.

A *selector* is a regex (searched in the '/'-joined key path, e.g.
``model/layers/0/self_attn/q_proj/kernel``), a list of selectors, a callable
``(path, leaf) -> bool``, or ``"all-linear"``: every Dense-style kernel (a leaf
named ``kernel`` with at least two axes) except an output head, as PEFT's
``target_modules="all-linear"`` does. With a layout from
`jlora.infer_layout`, `select_inferred` picks among the matmul weights the
model showed instead.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Any, Callable, Sequence, Union

import jax.numpy as jnp

Selector = Union[str, Callable[[str, Any], bool], Sequence[Any], None]

ALL_LINEAR = "all-linear"

# Output heads that "all-linear" leaves alone: adapting the vocabulary
# projection is rarely wanted and costs the most.
HEAD_PATTERN = re.compile(
    r"(^|/)(lm_head|head|output_head|classifier|score|logits)(/|$)")


# Leaf names that are never matmul kernels, even when stacked to 2-D by a
# scan over layers (a (layers, out) bias).
NON_KERNEL_NAMES = frozenset({"bias", "scale"})


# Embedding tables: "all-linear" skips them, and so do its warnings.
EMBEDDING_PATTERN = re.compile(r"(^|/)[^/]*emb[^/]*(/|$)", re.IGNORECASE)

_INFER_HINT = (
    "infer every matmul weight and its layout from the model with layout ="
    " jlora.infer_layout(fn, params, *args), then jlora.apply(params, rank,"
    " key=key, layout=layout) (and jlora.quantize(params, method,"
    " layout=layout) for a quantized base)")


def path_regex(path: str) -> str:
  """A regex for `path` and its siblings in other layers.

  Layer numbers, a numeric component or a ``_N`` suffix, become ``\\d+``:

  >>> path_regex("layers/0/attn/q_einsum/w"), path_regex("layer_3/mlp/w")
  ('layers/\\\\d+/attn/q_einsum/w', 'layer_\\\\d+/mlp/w')
  """
  def part_regex(part: str) -> str:
    m = re.fullmatch(r"(.*_)?(\d+)", part)
    return re.escape(m.group(1) or "") + r"\d+" if m else re.escape(part)
  return "/".join(part_regex(part) for part in path.split("/"))


def format_layout_dict(layouts: dict[str, str]) -> str:
  """``{r'layers/\\d+/w': 'oio'}``: regex keys as raw strings, to paste."""
  return "{" + ", ".join(f"{_raw(k)}: {v!r}" for k, v in layouts.items()) + "}"


def _raw(pattern: str) -> str:
  return f"r'{pattern}'" if "\\" in pattern and "'" not in pattern else (
      repr(pattern))


def compact_paths(paths: list[str]) -> str:
  """`paths` with layers folded (one `path_regex` per distinct pattern),
  listed as raw strings to paste: ``[r'layers/\\d+/q_proj/w', ...]``."""
  patterns = dict.fromkeys(path_regex(p) for p in paths)
  return "[" + ", ".join(_raw(p) for p in patterns) + "]"


def is_matrix(leaf: Any) -> bool:
  shape = getattr(leaf, "shape", None)
  return shape is not None and len(shape) >= 2 and hasattr(leaf, "dtype")


def is_floating(leaf: Any) -> bool:
  """LoRA adapts floating-point kernels only: an integer or bool kernel
  would truncate ``w + scale * a @ b``."""
  return jnp.issubdtype(leaf.dtype, jnp.floating)


def _is_kernel_like(path: str, leaf: Any) -> bool:
  return is_matrix(leaf) and path.rsplit("/", 1)[-1] not in NON_KERNEL_NAMES


def _is_candidate(path: str, leaf: Any) -> bool:
  return _is_kernel_like(path, leaf) and is_floating(leaf)


def is_linear_kernel(path: str, leaf: Any) -> bool:
  """A leaf named ``kernel`` with ndim >= 2 that is not an output head."""
  return (path.rsplit("/", 1)[-1] == "kernel" and is_matrix(leaf)
          and not HEAD_PATTERN.search(path))


def _as_list(selector: Selector) -> list[Any]:
  if selector is None:
    return []
  if isinstance(selector, (str, re.Pattern)) or callable(selector):
    return [selector]
  if not isinstance(selector, (list, tuple, set, frozenset)):
    raise TypeError(
        f"a selector must be a regex string, a callable (path, leaf) -> bool,"
        f" '{ALL_LINEAR}' or a list of them, got {type(selector).__name__}:"
        f" {selector!r}")
  return list(selector)


def matcher(sel: Any) -> Callable[[str, Any], bool]:
  if isinstance(sel, str) and sel == ALL_LINEAR:
    return is_linear_kernel
  if isinstance(sel, (str, re.Pattern)):
    try:
      rx = re.compile(sel)
    except re.error as e:
      raise ValueError(f"target {sel!r} is not a valid regex: {e}") from None
    return lambda path, leaf: rx.search(path) is not None
  if callable(sel):
    return lambda path, leaf: bool(sel(path, leaf))
  raise TypeError(
      f"a target must be a regex string, a callable (path, leaf) -> bool or"
      f" '{ALL_LINEAR}', got {type(sel).__name__}: {sel!r}")


def _near_misses(sel: Any, paths: list[str], n: int = 5) -> list[str]:
  if not isinstance(sel, str):
    return paths[:n]
  text = re.sub(r"[\\^$.*+?()\[\]{}|]", "", sel)
  scored = sorted(paths, key=lambda p: -difflib.SequenceMatcher(
      None, text, p).ratio())
  return scored[:n]


def select(leaves: list[tuple[str, Any]], targets: Selector = None,
           exclude: Selector = None) -> list[str]:
  """Paths of the matrix leaves chosen by `targets` minus `exclude`.

  Every explicit target must match at least one matrix leaf; one that
  matches none raises ValueError listing near-miss paths.

  >>> select([("dense/kernel", w), ("dense/bias", b)], "dense")
  ['dense/kernel']
  """
  matrices = [(p, x) for p, x in leaves if _is_candidate(p, x)]
  all_paths = [p for p, _ in leaves]
  chosen: set[str] = set()
  not_floating: list[str] = []
  selectors = _as_list(targets)
  if targets is not None and not selectors:
    raise ValueError(
        "targets=[] selects nothing; pass None for the default"
        f" '{ALL_LINEAR}', or the regexes of the kernels to adapt")
  for sel in selectors or [ALL_LINEAR]:
    match = matcher(sel)
    hits = [p for p, x in matrices if match(p, x)]
    if isinstance(sel, str) and sel == ALL_LINEAR:
      _check_all_linear(matrices, hits)
    # An explicit target that picks an integer kernel is an error, never
    # skipped silently ("all-linear" only looks at float kernels).
    bad = [] if isinstance(sel, str) and sel == ALL_LINEAR else [
        p for p, x in leaves if _is_kernel_like(p, x) and not is_floating(x)
        and match(p, x)]
    not_floating += bad
    if not hits and not bad:
      others = [p for p, x in leaves if not _is_candidate(p, x) and match(p, x)]
      hint = (f" It matched only biases, scales or leaves with fewer than 2"
              f" axes: {others}." if others else "")
      near = _near_misses(sel, [p for p, _ in matrices] or all_paths)
      raise ValueError(
          f"target {sel!r} matched no kernel (a leaf with >= 2 axes).{hint}"
          f" Closest paths: {near}. Targets are regexes searched in the"
          " '/'-joined path, e.g. r'(q_proj|v_proj)/kernel'.")
    chosen.update(hits)
  excluded = set()
  for sel in _as_list(exclude):
    match = matcher(sel)
    if not any(match(p, x) for p, x in leaves):
      raise ValueError(
          f"exclude {sel!r} matches no parameter, so it excludes nothing."
          f" Closest paths: {_near_misses(sel, all_paths)}")
    excluded |= {p for p, x in leaves if _is_kernel_like(p, x) and match(p, x)}
  chosen -= excluded
  not_floating = [p for p in dict.fromkeys(not_floating) if p not in excluded]
  if not_floating:
    dtypes = {p: str(x.dtype) for p, x in leaves if p in not_floating}
    raise ValueError(
        f"targets select kernels that are not floating point: {dtypes}. LoRA"
        " adapts float kernels only (an integer or bool kernel would truncate"
        " the update); narrow the targets or add exclude="
        f"{[re.escape(p) for p in not_floating][:3]}")
  return [p for p, _ in matrices if p in chosen]


def _check_all_linear(matrices: list[tuple[str, Any]], hits: list[str]):
  """Raises if "all-linear" found nothing, warns about what it skipped.

  "all-linear" goes by the name ``kernel``; NNX and Einsum weights are
  often ``w``, equinox's ``weight``, and those it would skip silently.
  """
  skipped = [p for p, _ in matrices if p.rsplit("/", 1)[-1] != "kernel"
             and not HEAD_PATTERN.search(p)
             and not EMBEDDING_PATTERN.search(p)]
  if not hits:
    found = (f" The leaves with >= 2 axes are {compact_paths(skipped)}." if
             skipped else "")
    raise ValueError(
        f"targets '{ALL_LINEAR}' (the default) picks leaves named 'kernel'"
        f" with >= 2 axes, and params have none.{found} To adapt them,"
        f" {_INFER_HINT}; or name them with targets=r'...'.")
  if skipped:
    warnings.warn(
        f"targets '{ALL_LINEAR}' (the default) picks leaves named 'kernel'"
        f" and skips these leaves with >= 2 axes: {compact_paths(skipped)}."
        f" If they are matmul weights, {_INFER_HINT}; or name them with"
        " targets=r'...'.", UserWarning,
        stacklevel=5)  # the user's apply/quantize, through select_targets


def select_inferred(leaves: list[tuple[str, Any]], layouts: Any,
                    targets: Selector = None,
                    exclude: Selector = None) -> list[str]:
  """Paths chosen among the weights of an inferred `Layouts` dict.

  By default its ``targets`` (every matmul weight but output heads and
  embeddings); explicit `targets` pick among all its weights (a head too,
  when named), `exclude` removes.
  """
  present = {p for p, _ in leaves}
  missing = [p for p in layouts if p not in present]
  if missing:
    raise ValueError(
        f"layout names leaves that params do not have: {missing[:10]}; infer"
        " it from the same params tree you pass to jlora.apply")
  pool = [(p, x) for p, x in leaves if p in layouts]
  chosen: set[str] = set()
  for sel in _as_list(targets) or [ALL_LINEAR]:
    if isinstance(sel, str) and sel == ALL_LINEAR:
      chosen.update(layouts.targets)
      continue
    match = matcher(sel)
    hits = [p for p, x in pool if match(p, x)]
    if not hits:
      raise ValueError(
          f"target {sel!r} matched none of the matmul weights infer_layout"
          f" found. Closest: {_near_misses(sel, [p for p, _ in pool])}.")
    chosen.update(hits)
  for sel in _as_list(exclude):
    match = matcher(sel)
    chosen -= {p for p, x in pool if match(p, x)}
  if not chosen:
    raise ValueError(
        "no weight left to adapt: infer_layout found the matmul weights"
        f" {list(layouts)}, of which heads {list(layouts.heads)} and"
        f" embeddings {list(layouts.embeddings)} are skipped by default;"
        " name the ones to adapt with targets=")
  return [p for p, _ in pool if p in chosen]


def pattern_value(path: str, patterns: dict[str, Any] | None, default: Any):
  """The value of the first regex in `patterns` found in `path`."""
  for rx, value in (patterns or {}).items():
    if re.search(rx, path):
      return value
  return default
