"""Packed rows (segment_ids / positions): each document as if run alone.

float32 on CPU; the reference for a packed document is the same model run on
that document alone in its own row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models import LlamaForCausalLM, ModelConfig, init_cache
from jlora.models.llama import document_positions
from jlora.models.losses import chunked_cross_entropy

# Weights large enough that attention is far from uniform, so a token that
# leaked across documents would show.
CFG = ModelConfig(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  qkv_bias=True,
  initializer_range=0.3,
)
# Documents per row (lengths); the rest of the row is padding (segment 0).
ROW_LENGTH = 14
LAYOUT = ((5, 4, 3), (7, 6), (14,))


def packed_batch(seed=0, layout=LAYOUT):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, CFG.vocab_size, (len(layout), ROW_LENGTH))
  seg = np.zeros_like(ids)
  for r, lengths in enumerate(layout):
    start = 0
    for d, n in enumerate(lengths):
      seg[r, start : start + n] = d + 1
      start += n
  return ids, seg


def documents(ids, seg):
  """(row, slice) of every document."""
  out = []
  for r in range(ids.shape[0]):
    for d in sorted(set(seg[r]) - {0}):
      where = np.flatnonzero(seg[r] == d)
      out.append((r, slice(where[0], where[-1] + 1)))
  return out


def alone(apply, params, ids, seg):
  """Logits of every document run alone: each at the start of its own row,
  plain causal attention (what follows a document cannot reach it), one
  compile for all."""
  docs = documents(ids, seg)
  rows = np.zeros((len(docs), ids.shape[1]), ids.dtype)
  for i, (r, sl) in enumerate(docs):
    rows[i, : sl.stop - sl.start] = ids[r, sl]
  out = np.asarray(apply({"params": params}, jnp.asarray(rows)))
  return [(r, sl, out[i, : sl.stop - sl.start]) for i, (r, sl) in
          enumerate(docs)]


def make(cfg=CFG, **kw):
  model = LlamaForCausalLM(cfg, **kw)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return model, params["params"]


CASES = {
  "llama": dict(cfg=CFG),
  "llama_scan": dict(cfg=CFG, scan_layers=True),
  # A window (3) shorter than the documents, on alternating layers.
  "mixed_windows_scan": dict(
    cfg=dataclasses.replace(CFG, sliding_windows=(3, None)), scan_layers=True
  ),
  "window_auto": dict(
    cfg=dataclasses.replace(CFG, sliding_windows=(3, 3)), attention="auto"
  ),
  "qk_norm_remat": dict(
    cfg=dataclasses.replace(CFG, qk_norm=True, tie_word_embeddings=True),
    scan_layers=True,
    remat="full",
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_equal_documents_alone(case):
  model, params = make(**CASES[case])
  ids, seg = packed_batch()
  apply = jax.jit(model.apply)
  packed = np.asarray(
    apply({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg))
  )
  assert np.isfinite(packed).all()  # padding rows included
  for r, sl, want in alone(apply, params, ids, seg):
    np.testing.assert_allclose(packed[r, sl], want, atol=1e-5, rtol=0)


def test_explicit_positions_equal_default_positions():
  model, params = make()
  ids, seg = packed_batch()
  pos = np.asarray(document_positions(jnp.asarray(seg)))
  a = model.apply(
    {"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg)
  )
  b = model.apply(
    {"params": params},
    jnp.asarray(ids),
    positions=jnp.asarray(pos),
    segment_ids=jnp.asarray(seg),
  )
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Positions are not implied by the mask: spreading one document's
  # positions changes its logits (rope sees them) and nothing else.
  shifted = pos.copy()
  shifted[0, 5:9] *= 3
  c = np.asarray(
    model.apply(
      {"params": params},
      jnp.asarray(ids),
      positions=jnp.asarray(shifted),
      segment_ids=jnp.asarray(seg),
    )
  )
  assert np.abs(c[0, 5:9] - np.asarray(a)[0, 5:9]).max() > 1e-3
  np.testing.assert_array_equal(c[0, :5], np.asarray(a)[0, :5])


def test_changing_one_document_changes_no_other():
  model, params = make(
    dataclasses.replace(CFG, sliding_windows=(None, 4)), scan_layers=True
  )
  ids, seg = packed_batch()
  apply = jax.jit(model.apply)
  before = np.asarray(
    apply({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg))
  )
  edited = ids.copy()
  edited[0, 5:9] = (edited[0, 5:9] + 7) % CFG.vocab_size  # document 2, row 0
  after = np.asarray(
    apply(
      {"params": params}, jnp.asarray(edited), segment_ids=jnp.asarray(seg)
    )
  )
  assert np.abs(after[0, 5:9] - before[0, 5:9]).min() > 0
  others = np.ones(seg.shape, bool)
  others[0, 5:9] = False
  # Padding slots attend to nothing; their (meaningless) outputs are left out.
  others &= seg != 0
  np.testing.assert_array_equal(after[others], before[others])


def test_documents_start_their_positions_at_zero():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 1, 1, 2]])
  np.testing.assert_array_equal(
    document_positions(seg),
    [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 0]],
  )


def test_packed_loss_with_mask_equals_losses_alone():
  """Per-document next-token loss through a (B, T) loss mask (`where`)."""
  model, params = make()
  ids, seg = packed_batch()
  # Labels: the next token within the document; the last token of each
  # document (and padding) is masked out.
  labels = np.roll(ids, -1, axis=1)
  mask = (seg != 0) & (np.roll(seg, -1, axis=1) == seg)
  mask[:, -1] = False
  h = model.apply(
    {"params": params},
    jnp.asarray(ids),
    segment_ids=jnp.asarray(seg),
    return_hidden=True,
  )
  head = params["lm_head"]["kernel"]
  got = chunked_cross_entropy(
    h, head, jnp.asarray(labels), where=jnp.asarray(mask), reduction="sum",
    chunk_size=8,
  )
  want = 0.0
  for r, sl, logits in alone(model.apply, params, ids, seg):
    doc = ids[r, sl]
    logits = np.asarray(logits, np.float64)[:-1]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want -= logp[np.arange(len(doc) - 1), doc[1:]].sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_segment_ids_errors():
  model, params = make()
  ids, seg = packed_batch()
  with pytest.raises(ValueError, match="segment_ids has shape \\(3, 13\\)"):
    model.apply(
      {"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg[:, 1:])
    )
  with pytest.raises(TypeError, match="segment_ids must be integers"):
    model.apply(
      {"params": params},
      jnp.asarray(ids),
      segment_ids=jnp.asarray(seg, jnp.float32),
    )
  with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
    model.apply(
      {"params": params},
      jnp.asarray(ids),
      segment_ids=jnp.asarray(seg),
      cache=init_cache(model, 3, 20),
    )
