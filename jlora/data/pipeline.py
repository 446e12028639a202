"""Batches of packed rows through a grain pipeline.

`train_batches` is a `grain` dataset: deterministic for a seed, each epoch
reshuffled, read ahead by a thread, and its iterator's state (`it.get_state()`, a
small JSON-able dict) restores the exact position, so a resumed run sees the
batches it would have seen. With several processes each reads its own slice
of every global batch.

Example:
  >>> rows = jlora.data.pack(ds, seq_len=512)
  >>> it = iter(jlora.data.train_batches(rows, batch_size=8, seed=0))
  >>> batch = next(it)                  # dict of (8, 512) arrays
  >>> state = it.get_state()            # save with the checkpoint
  >>> it.set_state(state)               # after a restart
"""

from __future__ import annotations

import grain
import numpy as np

from jlora.data.packing import Rows


def train_batches(rows: Rows, batch_size: int, *, seed: int = 0,
                  shuffle: bool = True, shard_index: int = 0,
                  shard_count: int = 1, threads: int = 1,
                  prefetch: int = 16) -> grain.IterDataset:
  """An endless `grain.IterDataset` of training batches.

  Args:
    rows: packed (or padded) rows, `jlora.data.pack(...)`.
    batch_size: rows per global batch; each of `shard_count` processes gets
      `batch_size // shard_count` of them.
    seed: the shuffle seed (each epoch is shuffled anew).
    shuffle: shuffle rows; False reads them in order, epoch after epoch.
    shard_index, shard_count: this process's slice of every global batch
      (`jax.process_index()`, `jax.process_count()`).
    threads, prefetch: grain's reader threads and how many batches they keep
      ready ahead of the training loop.

  Returns:
    an IterDataset whose element k is global batch k's local part: a dict of
    (batch_size // shard_count, seq_len) arrays (see `jlora.data.packing`).
  """
  if len(rows) == 0:
    raise ValueError("no rows to train on")
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} does not divide over"
                     f" {shard_count} processes; use a multiple of"
                     f" {shard_count}")
  ds = grain.MapDataset.source(rows)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.batch(batch_size // shard_count, drop_remainder=True)
  # grain's default (16 threads, 500 elements ahead) is sized for heavy
  # per-example work; building a row is light.
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch))


def eval_batches(rows: Rows, batch_size: int, *, max_batches: int | None = None,
                 shard_index: int = 0, shard_count: int = 1
                 ) -> list[dict[str, np.ndarray]]:
  """Every row once, in order, in batches of `batch_size` (the last one
  filled with empty rows, all loss_mask 0, so every batch has one shape).

  `max_batches` keeps the first batches only.
  """
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} does not divide over"
                     f" {shard_count} processes")
  n = len(rows)
  if max_batches is not None:
    n = min(n, max_batches * batch_size)
  empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
  local = batch_size // shard_count
  out = []
  for start in range(0, n, batch_size):
    picked = [rows[i] if i < n else empty
              for i in range(start + shard_index * local,
                             start + (shard_index + 1) * local)]
    out.append({k: np.stack([r[k] for r in picked]) for k in empty})
  return out
