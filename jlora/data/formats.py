"""The three example formats, tokenized with a loss mask.

  text               {"text": "..."}                       every token counts
  prompt_completion  {"prompt": "...", "completion": "..."} completion only
  messages           {"messages": [{"role": ..., "content": ...}, ...]}
                                                            assistant turns only

An example becomes `ids` (n,) int32 and `mask` (n,) bool, `mask[t]` saying
whether token t is a training target (predicted from tokens < t). Chat data is
rendered with the tokenizer's own chat template; an assistant turn's tokens
are those between the rendering of the conversation up to it with the
generation prompt and the rendering through it, so the end-of-turn token is
learnt and the template's role headers are not.

Example:
  >>> ids, mask = encode({"prompt": "2+2=", "completion": "4"},
  ...                    "prompt_completion", tokenizer)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jlora.data._errors import TemplateError

FORMATS = ("text", "prompt_completion", "messages")
_FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion"),
           "messages": ("messages",)}
_EXAMPLES = {"text": '{"text": "..."}',
             "prompt_completion": '{"prompt": "...", "completion": "..."}',
             "messages": '{"messages": [{"role": "user", "content": "..."},'
                         ' {"role": "assistant", "content": "..."}]}'}


class _Bad(ValueError):
  """One example is invalid; `load` turns it into a `DataError` with the file
  and line."""


def detect_format(record: Any) -> str:
  """The format a record's keys imply ("messages" wins over the others)."""
  if isinstance(record, dict):
    if "messages" in record:
      return "messages"
    if "prompt" in record and "completion" in record:
      return "prompt_completion"
    if "text" in record:
      return "text"
  keys = sorted(record) if isinstance(record, dict) else type(record).__name__
  raise _Bad(f"cannot tell the format from the fields {keys}; an example is"
             f" one of {', '.join(_EXAMPLES.values())}")


def check_tokenizer(tokenizer: Any, fmt: str) -> None:
  """Raises `TemplateError` when `fmt` is "messages" and the tokenizer has no
  chat template."""
  if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
    raise TemplateError(
        f"the tokenizer ({type(tokenizer).__name__}) has no chat template"
        " (tokenizer.chat_template is None), which 'messages' data needs;"
        " use an instruct/chat model's tokenizer, set"
        " tokenizer.chat_template to a Jinja template (jlora-finetune"
        " --chat-template FILE), or convert the data to prompt/completion")


def encode(record: Any, fmt: str, tokenizer: Any, *,
           train_on_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes one example: `(ids (n,) int32, mask (n,) bool)`.

  Args:
    record: a dict in format `fmt`.
    fmt: one of `FORMATS`.
    tokenizer: a transformers tokenizer (fast, for chat data: offsets).
    train_on_prompt: mask on for every token (prompts, system and user
      turns, template headers) instead of completions / assistant turns only.

  Raises:
    ValueError: the example is invalid (missing or empty field, no assistant
      turn); `jlora.data.load` raises it as a `DataError` naming file and
      line.
    TemplateError: the chat template rewrites earlier turns.
  """
  if not isinstance(record, dict):
    raise _Bad(f"an example must be a JSON object, got {type(record).__name__}"
               f"; format {fmt!r} is {_EXAMPLES[fmt]}")
  missing = [k for k in _FIELDS[fmt] if k not in record]
  if missing:
    raise _Bad(f"no {' or '.join(repr(k) for k in missing)} field (fields:"
               f" {sorted(record)}); format {fmt!r} is {_EXAMPLES[fmt]}")
  if fmt == "text":
    ids, mask = _text(record, tokenizer)
  elif fmt == "prompt_completion":
    ids, mask = _prompt_completion(record, tokenizer)
  else:
    ids, mask = _messages(record["messages"], tokenizer)
  ids = np.asarray(ids, np.int32)
  mask = np.ones(len(ids), bool) if train_on_prompt else np.asarray(mask, bool)
  return ids, mask


def _string(record: dict, key: str, allow_empty: bool = False) -> str:
  value = record[key]
  if not isinstance(value, str):
    raise _Bad(f"field {key!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise _Bad(f"field {key!r} is empty: an empty example; remove it")
  return value


def _eos(tokenizer) -> list[int]:
  eos = getattr(tokenizer, "eos_token_id", None)
  return [] if eos is None else [int(eos)]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
  return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _text(record, tokenizer):
  ids = _ids(tokenizer, _string(record, "text"), True)
  eos = _eos(tokenizer)
  if eos and (not ids or ids[-1] != eos[0]):
    ids += eos  # documents end with end-of-text, as in pretraining
  return ids, [True] * len(ids)


def _prompt_completion(record, tokenizer):
  prompt = _ids(tokenizer, _string(record, "prompt", allow_empty=True), True)
  completion = _ids(tokenizer, _string(record, "completion"), False)
  completion += _eos(tokenizer)
  return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def _messages(messages, tokenizer):
  if not isinstance(messages, list) or not messages:
    raise _Bad("field 'messages' must be a non-empty list of {\"role\","
               " \"content\"} objects: an empty example")
  for k, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      raise _Bad(f"messages[{k}] must be an object with string 'role' and"
                 f" 'content', got {m!r:.80}")
  turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
  if not turns:
    raise _Bad("the chat has no assistant turn, so nothing to learn; add"
               " one ({\"role\": \"assistant\", \"content\": ...}) or remove"
               " the example")
  if not any(messages[k]["content"].strip() for k in turns):
    raise _Bad("every assistant turn is empty: an empty example")
  full = _render(tokenizer, messages, False)
  spans = []
  for k in turns:
    start = _render(tokenizer, messages[:k], True) if k else None
    end = _render(tokenizer, messages[:k + 1], False)
    if k and not full.startswith(start):
      _not_prefix(k, "with add_generation_prompt=True")
    if not full.startswith(end):
      _not_prefix(k + 1, "")
    if start is not None and not end.startswith(start):
      _not_prefix(k, "with add_generation_prompt=True")
    spans.append((len(start) if start is not None else
                  _assistant_start(tokenizer, messages, k, full), len(end)))
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
  mask = [any(a < e and b > s for s, e in spans) for a, b in offsets]
  return ids, mask


def _assistant_start(tokenizer, messages, k, full):
  """A chat that opens with the assistant: its turn starts after whatever
  the template renders for no messages with the generation prompt."""
  try:
    head = _render(tokenizer, [], True)
  except _Bad:
    head = ""
  return len(head) if full.startswith(head) else 0


def _render(tokenizer, messages, generation_prompt: bool) -> str:
  try:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)
  except Exception as e:  # jinja2's TemplateError, raise_exception(...)
    raise _Bad(f"the chat template failed on this conversation: {e}") from e


def _not_prefix(n: int, how: str) -> None:
  raise TemplateError(
      f"the chat template renders the first {n} message(s) {how} as text"
      " that is not a prefix of the whole conversation's rendering (it"
      " rewrites earlier turns, e.g. drops reasoning), so assistant tokens"
      " cannot be located; use a template without that behaviour"
      " (tokenizer.chat_template / --chat-template) or prompt/completion"
      " data")
