"""Packed rows from jlora.data through jlora.models: exactly each document
alone, and the masked loss by hand (float32, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.data as jd
from jlora import models

from helpers import randomize_b

SEQ = 256


@pytest.fixture(scope="module")
def setup():
  tok = jd.byte_tokenizer()
  ds = jd.load(jd.demo_path(), tok, cache_dir=None, verbose=False)
  ds, _ = jd.truncate(ds.select(range(40)), SEQ, "right")
  rows = jd.pack(ds, SEQ)
  cfg = models.ModelConfig(vocab_size=320, hidden_size=32,
                           intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=256)
  model, params = models.from_config(cfg, jax.random.key(0))
  lp = randomize_b(jlora.apply(params, rank=4, key=jax.random.key(1)),
                   jax.random.key(2), std=0.3)
  forward = jax.jit(jlora.wrap(model.apply))
  return ds, rows, lp, forward


def packed_logits(forward, lp, batch):
  return np.asarray(forward({"params": lp}, jnp.asarray(batch["input_ids"]),
                            segment_ids=jnp.asarray(batch["segment_ids"]),
                            positions=jnp.asarray(batch["positions"])))


def test_packed_rows_equal_each_document_alone(setup):
  ds, rows, lp, forward = setup
  several = [i for i in range(len(rows)) if len(rows.plan[i]) >= 2][:2]
  assert several, "the demo data should pack several examples per row"
  batch = {k: np.stack([rows[i][k] for i in several]) for k in jd.FIELDS}
  logits = packed_logits(forward, lp, batch)
  # Every document alone, one per row, at the row's start (the plain causal
  # model: what follows a document cannot change its logits).
  docs = [(r, k, int(d)) for r, i in enumerate(several)
          for k, d in enumerate(rows.plan[i])]
  alone_in = np.zeros((len(docs), SEQ), np.int32)
  for j, (_, _, d) in enumerate(docs):
    alone_in[j, :len(ds[d][0]) - 1] = ds[d][0][:-1]
  alone = np.asarray(forward({"params": lp}, jnp.asarray(alone_in)))
  loss_sum = count = 0.0
  for j, (r, k, doc) in enumerate(docs):
    ids, mask = ds[doc]
    n = len(ids) - 1
    on = batch["segment_ids"][r] == k + 1
    np.testing.assert_allclose(logits[r][on], alone[j, :n], atol=1e-5, rtol=0)
    # The document's loss, from its own logits, in float64.
    z = alone[j, :n].astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ce = lse - z[np.arange(n), ids[1:]]
    loss_sum += (ce * mask[1:]).sum()
    count += mask[1:].sum()
  # The batch loss is the mean over every counted target of every document.
  got = jd.masked_cross_entropy(jnp.asarray(logits),
                                jnp.asarray(batch["targets"]),
                                jnp.asarray(batch["loss_mask"]))
  np.testing.assert_allclose(float(got), loss_sum / count, rtol=1e-5)


def test_editing_one_document_leaves_the_others_unchanged(setup):
  ds, rows, lp, forward = setup
  i = next(i for i in range(len(rows)) if len(rows.plan[i]) >= 2)
  batch = {k: rows[i][k][None] for k in jd.FIELDS}
  before = packed_logits(forward, lp, batch)
  edited = dict(batch, input_ids=batch["input_ids"].copy())
  second = batch["segment_ids"][0] == 2
  edited["input_ids"][0, second] = (edited["input_ids"][0, second] + 7) % 256
  after = packed_logits(forward, lp, edited)
  others = ~second & (batch["segment_ids"][0] > 0)
  np.testing.assert_array_equal(after[0][others], before[0][others])
  assert np.abs(after[0][second] - before[0][second]).max() > 1e-3
