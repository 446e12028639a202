"""A byte-level transformers tokenizer with a chat template, built offline.

Token ids 0..255 are the UTF-8 bytes; 256.. are the special tokens
`<|endoftext|>` (end of text, padding), `<|im_start|>` and `<|im_end|>`. The
chat template is ChatML. It needs no download, so the offline demo and the
tests run the same code path as a real model's tokenizer.

Example:
  >>> tok = byte_tokenizer()
  >>> tok("hi")["input_ids"]
  [104, 105]
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_symbols() -> dict[int, str]:
  """Byte -> printable character, as GPT-2's byte-level BPE spells bytes:
  printable Latin-1 bytes stand for themselves, the rest map to 256 + k."""
  keep = (list(range(ord("!"), ord("~") + 1)) +
          list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
  symbols, extra = {}, 0
  for b in range(256):
    if b in keep:
      symbols[b] = chr(b)
    else:
      symbols[b] = chr(256 + extra)
      extra += 1
  return symbols


def byte_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
  """A `transformers.PreTrainedTokenizerFast` over bytes (259 tokens).

  Args:
    chat_template: the Jinja chat template (ChatML by default); None for
      none.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {s: b for b, s in _byte_symbols().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  out = PreTrainedTokenizerFast(tokenizer_object=tok,
                                eos_token=SPECIAL_TOKENS[0],
                                pad_token=SPECIAL_TOKENS[0])
  out.chat_template = chat_template
  return out
