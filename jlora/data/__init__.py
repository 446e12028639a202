"""Fine-tuning data: instruction and chat datasets, loss masks, packing.

  ds = jlora.data.load("chat.jsonl", tokenizer)            # tokenize (cached)
  ds, report = jlora.data.truncate(ds, seq_len=512)        # explicit policy
  train, heldout = ds.split(0.1, seed=0)
  rows = jlora.data.pack(train, seq_len=512)               # first-fit decreasing
  it = iter(jlora.data.train_batches(rows, batch_size=8))  # grain, resumable
  b = next(it)     # input_ids, targets, loss_mask, segment_ids, positions
  logits = model.apply({"params": p}, b["input_ids"],
                       segment_ids=b["segment_ids"], positions=b["positions"])
  loss = jlora.data.masked_cross_entropy(logits, b["targets"], b["loss_mask"])

Sources: .jsonl / .json / .parquet files (parquet needs pyarrow), a
`datasets.Dataset` or a list of dicts, in the formats "text",
"prompt_completion" and "messages" (rendered with the tokenizer's chat
template). The loss mask covers completions and assistant turns
(`train_on_prompt=True`: everything). `demo_path()` is the shipped instruction
dataset; `byte_tokenizer()` an offline byte-level tokenizer with a ChatML
template. `import jlora` does not import this package (it needs grain and
transformers: `pip install 'jlora[data]'`).
"""

import os as _os

from jlora.data._errors import DataError, TemplateError
from jlora.data.dataset import Tokenized, cache_key, load, tokenizer_fingerprint
from jlora.data.formats import FORMATS, detect_format, encode
from jlora.data.loss import masked_cross_entropy
from jlora.data.packing import (FIELDS, POLICIES, Rows, TruncationReport,
                                make_row, pack, pad, plan_ffd, truncate)
from jlora.data.pipeline import eval_batches, train_batches
from jlora.data.tokenizers import CHATML_TEMPLATE, byte_tokenizer


def demo_path(format: str = "messages") -> str:
  """Path of the shipped instruction dataset (400 examples) in `format`:
  "messages" or "prompt_completion"."""
  from jlora.data._demo_data import FILES, HERE
  if format not in FILES:
    raise ValueError(f"the demo data comes as {sorted(FILES)}, not {format!r}")
  return _os.path.join(HERE, FILES[format])


__all__ = [
    "CHATML_TEMPLATE", "DataError", "FIELDS", "FORMATS", "POLICIES", "Rows",
    "TemplateError", "Tokenized", "TruncationReport", "byte_tokenizer",
    "cache_key", "demo_path", "detect_format", "encode", "eval_batches",
    "load", "make_row", "masked_cross_entropy", "pack", "pad", "plan_ffd",
    "tokenizer_fingerprint", "train_batches", "truncate",
]
