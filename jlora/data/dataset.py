"""`load`: read, validate and tokenize a dataset once, cached on disk.

A `Tokenized` dataset holds every example's tokens and loss mask in two flat
arrays with offsets, and where each example came from (file and line), so
truncation, splitting and packing are cheap array work and every later
message can still name the line.

Examples:
  >>> ds = jlora.data.load("chat.jsonl", tokenizer)       # format detected
  >>> ds, report = jlora.data.truncate(ds, max_tokens=513, policy="right")
  >>> train, heldout = ds.split(0.1, seed=0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from jlora.data import _read, formats
from jlora.data._errors import DataError, TemplateError, where

# Bump when tokenization changes, so old cache entries are not reused.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """Tokenized examples: tokens and loss masks, flat, with offsets.

  Attributes:
    tokens: (total,) int32, every example's ids one after another.
    mask: (total,) bool, True where a token is a training target.
    offsets: (n + 1,) int64; example i is `tokens[offsets[i]:offsets[i+1]]`.
    lines: (n,) int64, each example's 1-based line (row) in its source.
    source: the file name (or "<records>", "<datasets.Dataset>").
    unit: "line" or "row", for messages.
    format: the example format.
  """

  tokens: np.ndarray
  mask: np.ndarray
  offsets: np.ndarray
  lines: np.ndarray
  source: str
  unit: str
  format: str

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)` of example i."""
    a, b = self.offsets[i], self.offsets[i + 1]
    return self.tokens[a:b], self.mask[a:b]

  @property
  def lengths(self) -> np.ndarray:
    """(n,) tokens per example."""
    return np.diff(self.offsets)

  def where(self, i: int) -> str:
    """'file.jsonl:12': where example i came from."""
    return where(self.source, int(self.lines[i]), self.unit)

  def check_vocab(self, vocab_size: int) -> None:
    """Raises DataError, naming the first example, unless every token id is
    in [0, vocab_size): ids from a tokenizer that is not the model's would
    index past its embedding, which under `jit` gives NaN, not an error.

    Examples:
      >>> ds.check_vocab(model.config.vocab_size)
    """
    bad = np.flatnonzero((self.tokens < 0) | (self.tokens >= vocab_size))
    if bad.size:
      i = int(np.searchsorted(self.offsets, bad[0], side="right")) - 1
      raise DataError(
          self.source, int(self.lines[i]),
          f"token id {int(self.tokens[bad[0]])} is outside the model's"
          f" vocabulary of {vocab_size} ({bad.size:,} such tokens in the"
          " data): the tokenizer does not belong to this model; use the"
          " model's own tokenizer", self.unit)

  def select(self, indices) -> Tokenized:
    """The examples at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    parts = [self[int(i)] for i in indices]
    return from_examples(parts, self.lines[indices], self.source, self.unit,
                         self.format)

  def split(self, fraction: float, seed: int = 0
            ) -> tuple[Tokenized, Tokenized]:
    """A random `(train, heldout)` split with `fraction` of the examples held
    out (at least one each)."""
    n = len(self)
    if n < 2:
      raise ValueError(f"{self.source}: {n} example(s) cannot be split into"
                       " training and held-out data; add examples")
    if not 0 < fraction < 1:
      raise ValueError(f"held-out fraction {fraction}; use 0 < f < 1")
    k = min(max(1, round(fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return self.select(np.sort(order[k:])), self.select(np.sort(order[:k]))


def from_examples(examples, lines, source: str, unit: str, fmt: str
                  ) -> Tokenized:
  """A `Tokenized` from `(ids, mask)` pairs."""
  lengths = np.asarray([len(ids) for ids, _ in examples], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = (np.concatenate([ids for ids, _ in examples]).astype(np.int32)
            if examples else np.zeros(0, np.int32))
  mask = (np.concatenate([m for _, m in examples]).astype(bool)
          if examples else np.zeros(0, bool))
  return Tokenized(tokens, mask, offsets, np.asarray(lines, np.int64), source,
                   unit, fmt)


def load(source: Any, tokenizer: Any, *, format: str = "auto",
         train_on_prompt: bool = False, cache_dir: str | None = "default",
         verbose: bool = True) -> Tokenized:
  """Reads and tokenizes a dataset, or returns it from the on-disk cache.

  Args:
    source: a .jsonl / .json / .parquet path, a `datasets.Dataset`, or a list
      of dicts.
    tokenizer: a transformers tokenizer; chat data uses its chat template.
    format: "text", "prompt_completion", "messages" (see
      `jlora.data.formats`), or "auto": from the first example's fields.
    train_on_prompt: the loss mask covers every token, not only completions
      and assistant turns.
    cache_dir: where tokenized datasets are kept, keyed by the source's
      content, the tokenizer (vocabulary, special tokens, chat template) and
      these options; "default" is $JLORA_CACHE or ~/.cache/jlora/data, None
      turns caching off.
    verbose: print where the data came from (file or cache).

  Returns:
    a `Tokenized` dataset.

  Raises:
    DataError: a malformed JSON line, a missing or empty field, a chat with
      no assistant turn; the message names the file and line.
    TemplateError: chat data and the tokenizer has no chat template.
  """
  name = _read.describe(source)
  if format not in ("auto",) + formats.FORMATS:
    raise ValueError(f"format={format!r}; use 'auto' or one of"
                     f" {formats.FORMATS}")
  path = None
  if cache_dir is not None:
    if cache_dir == "default":
      cache_dir = os.environ.get("JLORA_CACHE") or os.path.join(
          os.path.expanduser("~"), ".cache", "jlora", "data")
    key = cache_key(source, tokenizer, format=format,
                    train_on_prompt=train_on_prompt)
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.isfile(path):
      ds = _read_cache(path, name)
      if ds is not None:
        if verbose:
          print(f"data: {len(ds):,} examples ({ds.format}) from {name},"
                f" tokenized earlier (cache {path})")
        return ds
  ds = _tokenize(source, name, tokenizer, format, train_on_prompt)
  if path is not None:
    _write_cache(path, ds)
  if verbose:
    print(f"data: {len(ds):,} examples ({ds.format}), {len(ds.tokens):,}"
          f" tokens from {name}")
  return ds


def _tokenize(source, name, tokenizer, fmt, train_on_prompt) -> Tokenized:
  examples, lines = [], []
  unit = "line"
  for path, line, unit, record in _read.records(source):
    try:
      if fmt == "auto":
        fmt = formats.detect_format(record)
      if not examples:
        formats.check_tokenizer(tokenizer, fmt)
      ids, mask = formats.encode(record, fmt, tokenizer,
                                 train_on_prompt=train_on_prompt)
    except formats._Bad as e:
      raise DataError(path, line, str(e), unit) from None
    except TemplateError as e:
      raise TemplateError(f"{where(path, line, unit)}: {e}") from None
    if len(ids) == 0:
      raise DataError(path, line, "the example tokenizes to no tokens: an"
                      " empty example", unit)
    examples.append((ids, mask))
    lines.append(line)
  if not examples:
    raise DataError(name, None, "no examples; the file is empty")
  return from_examples(examples, lines, name, unit, fmt)


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """sha256 over what decides a tokenization: the tokenizer's full
  serialization when it has one (fast tokenizers), its vocabulary otherwise,
  its class, special tokens and chat template."""
  h = hashlib.sha256(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    h.update(backend.to_str().encode())
  elif hasattr(tokenizer, "get_vocab"):
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  else:
    raise TypeError(f"cannot fingerprint a {type(tokenizer).__name__} for"
                    " the cache; pass cache_dir=None")
  special = getattr(tokenizer, "special_tokens_map", {})
  h.update(json.dumps(special, sort_keys=True, default=str).encode())
  h.update(str(getattr(tokenizer, "chat_template", None)).encode())
  h.update(str(getattr(tokenizer, "eos_token_id", None)).encode())
  return h.hexdigest()


def cache_key(source: Any, tokenizer: Any, **options: Any) -> str:
  """The cache entry's name: sha256 of the source's content, the tokenizer
  and the options."""
  h = hashlib.sha256()
  h.update(_read.fingerprint(source).encode())
  h.update(tokenizer_fingerprint(tokenizer).encode())
  h.update(json.dumps(dict(options, version=CACHE_VERSION),
                      sort_keys=True).encode())
  return h.hexdigest()[:32]


def _write_cache(path: str, ds: Tokenized) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, tokens=ds.tokens, mask=ds.mask, offsets=ds.offsets,
             lines=ds.lines,
             meta=np.asarray(json.dumps({"unit": ds.unit,
                                         "format": ds.format})))
  os.replace(tmp, path)  # readers never see a half-written entry


def _read_cache(path: str, name: str) -> Tokenized | None:
  try:
    with np.load(path) as z:
      meta = json.loads(str(z["meta"]))
      return Tokenized(z["tokens"], z["mask"], z["offsets"], z["lines"], name,
                       meta["unit"], meta["format"])
  except (OSError, ValueError, KeyError) as e:
    print(f"data: ignoring unreadable cache entry {path} ({e});"
          " tokenizing again")
    return None
