"""jlora.data packing and the grain pipeline: FFD, rows, batches, resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora.data as jd


def naive_ffd(sizes, capacity):
  """First-fit decreasing written plainly: O(n * bins)."""
  order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
  bins, free = [], []
  for i in order:
    for b in range(len(bins)):
      if free[b] >= sizes[i]:
        bins[b].append(i)
        free[b] -= sizes[i]
        break
    else:
      bins.append([i])
      free.append(capacity - sizes[i])
  return bins


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64).flatmap(lambda cap: st.tuples(
    st.just(cap), st.lists(st.integers(1, cap), max_size=80))))
def test_ffd_matches_plain_first_fit_decreasing(case):
  capacity, sizes = case
  bins = jd.plan_ffd(sizes, capacity)
  assert [b.tolist() for b in bins] == naive_ffd(sizes, capacity)
  placed = np.sort(np.concatenate(bins)) if bins else np.array([])
  np.testing.assert_array_equal(placed, np.arange(len(sizes)))
  assert all(sum(sizes[i] for i in b) <= capacity for b in bins)


def test_ffd_rejects_items_larger_than_a_bin():
  with pytest.raises(ValueError, match=r"\[1, 8\]"):
    jd.plan_ffd([3, 9], 8)


@pytest.fixture(scope="module")
def tok():
  return jd.byte_tokenizer()


def make_ds(tok, n=30, seed=0):
  r = np.random.default_rng(seed)
  rows = [{"prompt": "p" * int(r.integers(1, 10)),
           "completion": "c" * int(r.integers(1, 20))} for _ in range(n)]
  return jd.load(rows, tok, cache_dir=None, verbose=False)


def test_rows_by_hand(tok):
  ds = jd.load([{"prompt": "ab", "completion": "c"},
                {"prompt": "", "completion": "xyz"}], tok, cache_dir=None,
               verbose=False)
  row = jd.make_row(ds, [0, 1], 10)
  # Example 0: a b c EOS (3 slots); example 1: x y z EOS (3 slots); 4 pads.
  a, b, c, x, y, z, e = *b"abcxyz", 256
  assert row["input_ids"].tolist() == [a, b, c, x, y, z, 0, 0, 0, 0]
  assert row["targets"].tolist() == [b, c, e, y, z, e, 0, 0, 0, 0]
  assert row["loss_mask"].tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 0, 0]
  assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0, 0]
  assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 0, 0, 0, 0]
  assert row["loss_mask"].dtype == np.float32
  with pytest.raises(ValueError, match="more than 5 slots"):
    jd.make_row(ds, [0, 1], 5)


def test_pack_keeps_every_target_once_in_fewer_rows(tok):
  ds = make_ds(tok)
  packed, padded = jd.pack(ds, 32), jd.pad(ds, 32)
  assert len(packed) < len(padded) == len(ds)
  assert packed.stats()["fill"] > padded.stats()["fill"]
  seen = []
  for i in range(len(packed)):
    row = packed[i]
    for k, doc in enumerate(packed.plan[i]):
      on = row["segment_ids"] == k + 1
      ids, mask = ds[int(doc)]
      np.testing.assert_array_equal(row["input_ids"][on], ids[:-1])
      np.testing.assert_array_equal(row["targets"][on], ids[1:])
      np.testing.assert_array_equal(row["loss_mask"][on], mask[1:])
      np.testing.assert_array_equal(row["positions"][on],
                                    np.arange(len(ids) - 1))
      seen.append(int(doc))
    assert (row["loss_mask"][row["segment_ids"] == 0] == 0).all()
  assert sorted(seen) == list(range(len(ds)))


def test_pack_refuses_untruncated_data(tok):
  ds = jd.load([{"text": "x" * 40}], tok, cache_dir=None, verbose=False)
  with pytest.raises(jd.DataError, match=r"row 1: .*truncate"):
    jd.pack(ds, 16)


def test_batches_static_shapes_epochs_and_exact_resume(tok):
  rows = jd.pack(make_ds(tok, n=40), 32)
  n = len(rows)
  ds = jd.train_batches(rows, 4, seed=3)
  it = iter(ds)
  batches = [next(it) for _ in range(2 * n // 4 + 2)]
  for b in batches:
    assert set(b) == set(jd.FIELDS)
    assert all(v.shape == (4, 32) for v in b.values())
  # The first epoch is every row once, the second a different order.
  ids = np.concatenate([b["input_ids"] for b in batches])
  rows_ids = {rows[i]["input_ids"].tobytes() for i in range(n)}
  first = [r.tobytes() for r in ids[:n]]
  assert sorted(first) == sorted(rows[i]["input_ids"].tobytes()
                                 for i in range(n))
  assert set(r.tobytes() for r in ids[n:2 * n]) <= rows_ids
  assert first != [r.tobytes() for r in ids[n:2 * n]]
  # The iterator state restores the exact position.
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  again = iter(jd.train_batches(rows, 4, seed=3))
  again.set_state(state)
  for w in want:
    got = next(again)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_process_shards_make_up_the_global_batch(tok):
  rows = jd.pack(make_ds(tok, n=40), 32)
  whole = iter(jd.train_batches(rows, 4, seed=1))
  parts = [iter(jd.train_batches(rows, 4, seed=1, shard_index=p,
                                 shard_count=2)) for p in range(2)]
  for _ in range(3):
    g = next(whole)["input_ids"]
    local = [next(p)["input_ids"] for p in parts]
    assert local[0].shape == (2, 32)
    got = sorted(r.tobytes() for x in local for r in x)
    assert got == sorted(r.tobytes() for r in g)
  with pytest.raises(ValueError, match="divide"):
    jd.train_batches(rows, 3, shard_count=2)


def test_eval_batches_cover_every_row_once_with_empty_filler(tok):
  rows = jd.pack(make_ds(tok, n=25), 32)
  batches = jd.eval_batches(rows, 4)
  assert len(batches) == -(-len(rows) // 4)
  stacked = np.concatenate([b["input_ids"] for b in batches])[:len(rows)]
  for i in range(len(rows)):
    np.testing.assert_array_equal(stacked[i], rows[i]["input_ids"])
  tail = np.concatenate([b["loss_mask"] for b in batches])[len(rows):]
  assert (tail == 0).all()
  assert len(jd.eval_batches(rows, 4, max_batches=1)) == 1
