"""The exceptions of `jlora.data`."""

from __future__ import annotations


class DataError(ValueError):
  """A bad example or file; the message names the file and line.

  Attributes:
    path: the file (or "<records>", "<datasets.Dataset>").
    line: 1-based line (row for parquet, datasets and lists), or None.
  """

  def __init__(self, path: str, line: int | None, message: str,
               unit: str = "line"):
    self.path, self.line = path, line
    super().__init__(f"{where(path, line, unit)}: {message}")


def where(path: str, line: int | None, unit: str = "line") -> str:
  """'train.jsonl:12' for a line, 'x.parquet row 3' for a row."""
  if line is None:
    return path
  return f"{path}:{line}" if unit == "line" else f"{path} {unit} {line}"


class TemplateError(ValueError):
  """The tokenizer cannot render chat data (no template, or a template whose
  rendering of a conversation's beginning is not a prefix of the whole)."""
