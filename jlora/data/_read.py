"""Records from .jsonl / .json / .parquet files, a `datasets.Dataset` or a list.

Each record comes with where it came from ("train.jsonl:12", "x.parquet row
3"), so every later error can name the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from jlora.data._errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def describe(source: Any) -> str:
  """A short name of a source for messages and the cache key."""
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  if isinstance(source, (list, tuple)):
    return "<records>"
  if hasattr(source, "column_names"):
    return "<datasets.Dataset>"
  return f"<{type(source).__name__}>"


def fingerprint(source: Any) -> str:
  """sha256 of a source's content: file bytes, records' JSON, or the
  `datasets.Dataset` fingerprint."""
  h = hashlib.sha256()
  if isinstance(source, (str, os.PathLike)):
    with open(source, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  elif isinstance(source, (list, tuple)):
    h.update(json.dumps(list(source), sort_keys=True, default=str).encode())
  else:
    fp = getattr(source, "_fingerprint", None)
    if fp is None:
      raise TypeError(
          f"cannot fingerprint a {type(source).__name__} for the cache; pass"
          " a file path, a list of dicts or a datasets.Dataset, or"
          " cache_dir=None")
    h.update(f"datasets:{fp}".encode())
  return h.hexdigest()


def records(source: Any) -> Iterator[tuple[str, int, str, Any]]:
  """Yields `(name, line, unit, record)`: `line` is 1-based and `unit` is
  "line" for .jsonl/.json, "row" for parquet, datasets and lists."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such data file")
    if path.endswith(".jsonl"):
      yield from _jsonl(path)
    elif path.endswith(".json"):
      yield from _json(path)
    elif path.endswith(".parquet"):
      yield from _parquet(path)
    elif path.endswith(".txt"):
      with open(path, encoding="utf-8") as f:  # one document
        yield path, 1, "line", {"text": f.read()}
    else:
      raise DataError(
          path, None, "unknown file type; use .jsonl (one JSON object per"
          " line), .json (a JSON array of objects), .parquet or .txt (one"
          " text)")
  elif isinstance(source, (list, tuple)):
    for i, r in enumerate(source):
      yield "<records>", i + 1, "row", r
  elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):
    for i in range(len(source)):  # a datasets.Dataset: rows are dicts
      yield "<datasets.Dataset>", i + 1, "row", source[i]
  else:
    raise TypeError(
        f"cannot read data from a {type(source).__name__}; pass a .jsonl /"
        " .json / .parquet path, a datasets.Dataset or a list of dicts")


def _jsonl(path: str):
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue  # a blank line is no example (e.g. a trailing newline)
      try:
        yield path, n, "line", json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(path, n, f"malformed JSON ({e.msg} at column"
                        f" {e.colno}); each line must be one JSON object")\
            from None


def _json(path: str):
  """A JSON array of objects, each with the line it starts on."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  decoder = json.JSONDecoder()
  line_of = lambda pos: text.count("\n", 0, pos) + 1
  i = _skip(text, 0)
  if i >= len(text) or text[i] != "[":
    raise DataError(path, line_of(i), "a .json data file must hold one JSON"
                    " array of objects; for one object per line use .jsonl")
  i = _skip(text, i + 1)
  if i < len(text) and text[i] == "]":
    return
  while True:
    try:
      value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataError(path, e.lineno, f"malformed JSON ({e.msg} at column"
                      f" {e.colno})") from None
    yield path, line_of(i), "line", value
    i = _skip(text, end)
    if i < len(text) and text[i] == ",":
      i = _skip(text, i + 1)
    elif i < len(text) and text[i] == "]":
      if _skip(text, i + 1) != len(text):
        raise DataError(path, line_of(i), "text after the closing ']'")
      return
    else:
      raise DataError(path, line_of(i), "malformed JSON: expected ',' or ']'"
                      " between array elements")


def _skip(text: str, i: int) -> int:
  while i < len(text) and text[i] in " \t\r\n":
    i += 1
  return i


def _parquet(path: str):
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(
        f"reading {path} needs pyarrow: pip install 'jlora[data]'"
        " (or pip install pyarrow)") from None
  table = pq.read_table(path)
  for i, row in enumerate(table.to_pylist()):
    yield path, i + 1, "row", row
