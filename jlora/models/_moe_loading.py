"""Where a Mixture-of-Experts checkpoint keeps its experts, and how to read them.

transformers 5 holds each layer's experts fused, as 3-D parameters
(`mlp.experts.gate_up_proj` (E, 2 inner, hidden), gate rows first, and
`mlp.experts.down_proj` (E, hidden, inner)); `save_pretrained` writes them
back as one Linear per expert, the layout of the published checkpoints:

  Qwen3-MoE  model.layers.<i>.mlp.experts.<e>.{gate,up,down}_proj.weight
             model.layers.<i>.mlp.gate.weight                     (E, hidden)
  Mixtral    model.layers.<i>.block_sparse_moe.experts.<e>.w{1,3,2}.weight
             model.layers.<i>.block_sparse_moe.gate.weight
             (w1 = gate, w3 = up, w2 = down)

Every one of these is read (per layer, whichever is complete) into
`jlora.models`' stacked (E, in, out) kernels; anything else raises
`CheckpointMismatchError` naming the layer, what was found and what can be
read.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

# Our leaves (relative to a layer) and what they hold.
_GATE_UP = "mlp/experts/gate_up_proj/kernel"
_DOWN = "mlp/experts/down_proj/kernel"
_ROUTER = "mlp/gate/weight"
_LEAVES = (_GATE_UP, _DOWN, _ROUTER)


class _Layout(NamedTuple):
  """One way a checkpoint stores a layer's experts."""

  description: str
  prefix: str  # the MoE block's module name
  names: tuple[str, str, str] | None  # per-expert (gate, up, down); None: fused


_LAYOUTS = (
  _Layout("fused 3-D parameters (transformers 5): mlp.experts.gate_up_proj "
          "(E, 2 * inner, hidden), gate rows first, and mlp.experts.down_proj "
          "(E, hidden, inner)", "mlp", None),
  _Layout("one Linear per expert: mlp.experts.<e>.{gate,up,down}_proj.weight",
          "mlp", ("gate_proj", "up_proj", "down_proj")),
  _Layout("Mixtral's Linear per expert: block_sparse_moe.experts.<e>."
          "{w1,w3,w2}.weight (gate, up, down)", "block_sparse_moe",
          ("w1", "w3", "w2")),
  _Layout("Mixtral's Linear per expert under mlp: mlp.experts.<e>."
          "{w1,w3,w2}.weight", "mlp", ("w1", "w3", "w2")),
  _Layout("fused 3-D parameters under block_sparse_moe", "block_sparse_moe",
          None),
)


def is_expert_leaf(path: str) -> bool:
  return path.endswith(_LEAVES) and "/layers/" in f"/{path}"


def _keys(layout: _Layout, layer: str, e: int) -> dict[str, list[str]]:
  """HF keys of each leaf of one layer in `layout`."""
  p = f"{layer}.{layout.prefix}"
  router = [f"{p}.gate.weight"]
  if layout.names is None:
    return {_GATE_UP: [f"{p}.experts.gate_up_proj"],
            _DOWN: [f"{p}.experts.down_proj"], _ROUTER: router}
  gate, up, down = layout.names
  per = lambda name: [f"{p}.experts.{j}.{name}.weight" for j in range(e)]  # noqa: E731
  return {_GATE_UP: per(gate) + per(up), _DOWN: per(down), _ROUTER: router}


def _shapes(layout: _Layout, leaf: str, e: int, h: int, f: int):
  if leaf == _ROUTER:
    return [(e, h)]
  if layout.names is None:
    return [(e, 2 * f, h) if leaf == _GATE_UP else (e, h, f)]
  return [(f, h)] * (2 * e) if leaf == _GATE_UP else [(h, f)] * e


def _build(layout: _Layout, leaf: str):
  if leaf == _ROUTER:
    return lambda xs: xs[0].T  # (E, hidden) -> (hidden, E)
  if layout.names is None:
    return lambda xs: np.swapaxes(xs[0], 1, 2)  # (E, out, in) -> (E, in, out)
  if leaf == _DOWN:
    return lambda xs: np.stack([x.T for x in xs])
  def gate_up(xs):
    e = len(xs) // 2
    return np.stack([np.concatenate([xs[j].T, xs[e + j].T], axis=1)
                     for j in range(e)])
  return gate_up


def _choose(layer: str, e: int, available) -> _Layout:
  """The layout in which the checkpoint holds all of one layer's experts."""
  scored = []
  for layout in _LAYOUTS:
    keys = [k for ks in _keys(layout, layer, e).values() for k in ks]
    present = sum(k in available for k in keys)
    if present == len(keys):
      return layout
    scored.append((present / len(keys), layout, keys))
  from jlora.models.loading import CheckpointMismatchError

  found = sorted(k for k in available if re.match(
    rf"{re.escape(layer)}\.(mlp|block_sparse_moe)\.", k))
  _, closest, keys = max(scored, key=lambda s: s[0])
  missing = [k for k in keys if k not in available]
  hint = (f" Closest: {closest.description}, which lacks {missing[:4]}"
          f"{' and more' if len(missing) > 4 else ''}." if found else "")
  readable = "; ".join(f"({n}) {lay.description}"
                       for n, lay in enumerate(_LAYOUTS, 1))
  raise CheckpointMismatchError(
    f"cannot read the experts of '{layer}': the checkpoint holds "
    f"{found[:6]}{' ...' if len(found) > 6 else ''} there ({len(found)} "
    f"tensors) and config.json asks for {e} experts.{hint} jlora.models "
    f"reads experts as {readable}, each with the router at "
    "'<block>.gate.weight' (E, hidden). Re-save the checkpoint in one of "
    "these layouts (e.g. load it with transformers and save_pretrained), or "
    "fix config.json (num_experts / num_local_experts) if it belongs to "
    "other weights"
  )


def sources(path: str, model: Any, available, source_cls) -> list:
  """One `source_cls(keys, shapes, build)` per layer for an expert leaf."""
  c = model.config
  e, h, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
  leaf = next(x for x in _LEAVES if path.endswith(x))
  if model.scan_layers:
    layers = [f"model.layers.{i}" for i in range(c.num_layers)]
  else:
    parts = path.split("/")
    layers = [".".join(parts[:3])]  # model.layers.<i>
  out = []
  for layer in layers:
    layout = _choose(layer, e, available)
    out.append(source_cls(tuple(_keys(layout, layer, e)[leaf]),
                          tuple(_shapes(layout, leaf, e, h, f)),
                          _build(layout, leaf)))
  return out
