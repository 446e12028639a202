"""jlora.data: reading, formats, loss masks, errors, cache, truncation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jlora.data as jd
from jlora.data import _demo_data, formats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 256  # the byte tokenizer's <|endoftext|>


@pytest.fixture(scope="module")
def tok():
  return jd.byte_tokenizer()


@pytest.fixture(scope="module")
def bpe():
  """A trained byte-level BPE (merges cross letters) with a Llama-3-like
  chat template that opens with BOS and role headers."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  t = Tokenizer(models.BPE(unk_token=None))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train([os.path.join(ROOT, "examples", "data", "tiny_corpus.txt")],
          trainers.BpeTrainer(
              vocab_size=600, special_tokens=["<s>", "</s>", "<eot>"],
              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  out = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>",
                                eos_token="</s>")
  out.chat_template = (
      "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n"
      "{{ m['content'] }}<eot>{% endfor %}"
      "{% if add_generation_prompt %}[assistant]\n{% endif %}")
  return out


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def chat(*turns, system=None):
  msgs = [] if system is None else [{"role": "system", "content": system}]
  for k, t in enumerate(turns):
    msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": t})
  return {"messages": msgs}


# ------------------------------------------------------------------ formats


def test_prompt_completion_ids_and_mask_by_hand(tok):
  ids, mask = formats.encode({"prompt": "Q: hi\nA:", "completion": " yo"},
                             "prompt_completion", tok)
  want = list(b"Q: hi\nA:") + list(b" yo") + [EOS]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_array_equal(mask, [0] * 8 + [1] * 4)
  _, all_on = formats.encode({"prompt": "Q", "completion": "A"},
                             "prompt_completion", tok, train_on_prompt=True)
  assert all_on.all()


def test_text_counts_every_token_and_ends_with_eos(tok):
  ids, mask = formats.encode({"text": "abc"}, "text", tok)
  np.testing.assert_array_equal(ids, [97, 98, 99, EOS])
  assert mask.all()


def test_chat_mask_covers_exactly_the_assistant_turns(tok):
  ex = chat("What is 2+2?", "4", "And 3+3?", "6", system="Be brief.")
  ids, mask = formats.encode(ex, "messages", tok)
  # The whole conversation is the template's rendering, token for token.
  assert tok.decode(ids) == tok.apply_chat_template(ex["messages"],
                                                    tokenize=False)
  # Masked tokens: each answer with its end-of-turn; nothing of the system
  # or user turns, nor the role headers.
  assert tok.decode(ids[mask]) == "4<|im_end|>\n6<|im_end|>\n"
  runs = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
  for start in runs:  # each run starts right after "<|im_start|>assistant\n"
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_chat_mask_with_merging_bpe_and_bos(bpe):
  ex = chat("Tell me about the lighthouse.", "The keeper climbed the steps.",
            "And then?", "He wound the clockwork.")
  ids, mask = formats.encode(ex, "messages", bpe)
  assert ids[0] == bpe.bos_token_id and len(ids) < len(
      bpe.apply_chat_template(ex["messages"], tokenize=False))  # merged
  assert bpe.decode(ids[mask]) == ("The keeper climbed the steps.<eot>"
                                   "He wound the clockwork.<eot>")


def test_template_that_rewrites_history_is_refused(tok):
  import copy
  t = copy.deepcopy(tok)
  # Drops earlier assistant turns: a conversation's start is not a prefix.
  t.chat_template = (
      "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
      "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with pytest.raises(jd.TemplateError, match=r"<records> row 1: .*prefix"):
    jd.load([chat("a", "b", "c", "d")], t, cache_dir=None, verbose=False)


def test_format_detection_and_datasets_agree(tok, tmp_path):
  rows = [{"prompt": "p1", "completion": "c1"},
          {"prompt": "p2", "completion": "c2 longer"}]
  a = jd.load(rows, tok, cache_dir=None, verbose=False)
  assert a.format == "prompt_completion"
  b = jd.load(write_jsonl(tmp_path / "x.jsonl", rows), tok, cache_dir=None,
              verbose=False)
  (tmp_path / "x.json").write_text(json.dumps(rows, indent=2))
  c = jd.load(str(tmp_path / "x.json"), tok, cache_dir=None, verbose=False)
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
  d = jd.load(str(tmp_path / "x.parquet"), tok, cache_dir=None, verbose=False)
  import datasets
  e = jd.load(datasets.Dataset.from_list(rows), tok, cache_dir=None,
              verbose=False)
  for other in (b, c, d, e):
    np.testing.assert_array_equal(other.tokens, a.tokens)
    np.testing.assert_array_equal(other.mask, a.mask)
    np.testing.assert_array_equal(other.offsets, a.offsets)
  assert c.lines.tolist() == [2, 6]  # where each object starts in the .json


# ------------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(tok, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n\n{"text": "no close"\n')
  with pytest.raises(jd.DataError, match=r"bad\.jsonl:3: malformed JSON"):
    jd.load(str(path), tok, cache_dir=None, verbose=False)


def test_malformed_json_array_names_line(tok, tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
  with pytest.raises(jd.DataError, match=r"bad\.json:3: malformed JSON"):
    jd.load(str(path), tok, cache_dir=None, verbose=False)


@pytest.mark.parametrize("rows,fmt,line,message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "auto", 2,
     r"no 'completion' field"),
    ([{"text": "a"}, {"text": "  "}], "text", 2, r"'text' is empty"),
    ([{"text": "a"}, {"text": 3}], "text", 2, r"'text' must be a string"),
    ([chat("q", "a"), {"messages": [{"role": "user", "content": "q"}]}],
     "auto", 2, r"no assistant turn"),
    ([chat("q", "a"), {"messages": []}], "messages", 2, r"empty example"),
    ([chat("q", "a"), chat("q", "")], "messages", 2, r"assistant turn is"
     r" empty"),
    ([{"question": "q"}], "auto", 1, r"cannot tell the format"),
])
def test_bad_examples_name_file_and_line(tok, tmp_path, rows, fmt, line,
                                         message):
  path = write_jsonl(tmp_path / "d.jsonl", rows)
  with pytest.raises(jd.DataError, match=rf"d\.jsonl:{line}: .*{message}"):
    jd.load(path, tok, format=fmt, cache_dir=None, verbose=False)


def test_token_ids_past_the_models_vocabulary_name_the_example():
  from jlora.data.dataset import from_examples
  ids = [[1, 2, 3], [1, 50, 2], [60, 60]]
  ds = from_examples([(np.array(x, np.int32), np.ones(len(x), bool))
                      for x in ids], np.array([4, 7, 9]), "x.jsonl", "line",
                     "text")
  ds.check_vocab(61)
  with pytest.raises(jd.DataError, match=r"x\.jsonl:7: token id 50 is"
                     r" outside the model's vocabulary of 50 \(3 such"):
    ds.check_vocab(50)
  with pytest.raises(jd.DataError, match=r"x\.jsonl:9: token id 60"):
    ds.check_vocab(51)


def test_finetune_refuses_a_tokenizer_larger_than_the_model(monkeypatch,
                                                           tmp_path):
  import dataclasses

  from jlora.finetune import _steps, cli
  small = dataclasses.replace(_steps.DEMO_CONFIG, vocab_size=100)
  monkeypatch.setattr(_steps, "DEMO_CONFIG", small)
  with pytest.raises(SystemExit, match=r"demo.*outside the model's"
                     r" vocabulary of 100"):
    monkeypatch.setattr("sys.argv", ["jlora-finetune", "--steps", "1",
                                     "--cache-dir", "none", "--out",
                                     str(tmp_path)])
    cli.run()


def test_missing_chat_template_is_a_clear_error(tmp_path):
  no_template = jd.byte_tokenizer(chat_template=None)
  path = write_jsonl(tmp_path / "c.jsonl", [chat("q", "a")])
  with pytest.raises(jd.TemplateError,
                     match=r"c\.jsonl:1: .*no chat template.*chat_template"):
    jd.load(path, no_template, cache_dir=None, verbose=False)


def test_unknown_file_type(tok, tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("text\nhello\n")
  with pytest.raises(jd.DataError, match=r"d\.csv: unknown file type"):
    jd.load(str(path), tok, cache_dir=None)


# -------------------------------------------------------------------- cache


def test_cache_is_reused_and_keyed_by_content_tokenizer_options(
    tok, tmp_path, monkeypatch, capsys):
  path = tmp_path / "d.jsonl"
  write_jsonl(path, [chat("q1", "a1"), chat("q2", "a2")])
  cache = str(tmp_path / "cache")
  first = jd.load(str(path), tok, cache_dir=cache)
  assert len(os.listdir(cache)) == 1
  calls = []
  real = formats.encode
  monkeypatch.setattr(formats, "encode",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  again = jd.load(str(path), tok, cache_dir=cache)
  assert calls == [] and "tokenized earlier" in capsys.readouterr().out
  np.testing.assert_array_equal(again.tokens, first.tokens)
  np.testing.assert_array_equal(again.mask, first.mask)
  assert again.lines.tolist() == first.lines.tolist()
  # Each of these changes the key, so the data is tokenized again.
  jd.load(str(path), tok, cache_dir=cache, train_on_prompt=True)
  assert len(calls) == 2
  other = jd.byte_tokenizer(chat_template="{# v2 #}" + jd.CHATML_TEMPLATE)
  jd.load(str(path), other, cache_dir=cache)
  assert len(calls) == 4
  write_jsonl(path, [chat("q1", "a1"), chat("q2", "a2 changed")])
  changed = jd.load(str(path), tok, cache_dir=cache)
  assert len(calls) == 6 and len(os.listdir(cache)) == 4
  assert tok.decode(changed[1][0][changed[1][1]]).startswith("a2 changed")


# --------------------------------------------------------------- truncation


def texts(*strings):
  return [{"text": s} for s in strings]


def test_truncation_policies(tok):
  ds = jd.load(texts("abcdefghij", "xyz"), tok, cache_dir=None,
               verbose=False)
  full = list(b"abcdefghij") + [EOS]  # 11 tokens; cap = seq_len + 1 = 5
  right, r = jd.truncate(ds, 4, "right")
  assert right[0][0].tolist() == full[:5] and right[1][0].tolist() == [
      120, 121, 122, EOS]
  assert (r.truncated, r.tokens_cut, r.kept) == (1, 6, 2)
  left, _ = jd.truncate(ds, 4, "left")
  assert left[0][0].tolist() == full[-5:]
  dropped, r = jd.truncate(ds, 4, "drop")
  assert len(dropped) == 1 and r.dropped_too_long == 1
  assert "1 skipped as longer than 5 tokens" in str(r)
  split, r = jd.truncate(ds, 4, "split")
  pieces = [split[i][0].tolist() for i in range(3)]
  assert pieces == [full[0:5], full[4:9], full[8:11]]
  # Every target (input -> next token pair) of the document exactly once.
  pairs = [(p[k], p[k + 1]) for p in pieces for k in range(len(p) - 1)]
  assert pairs == [(full[k], full[k + 1]) for k in range(10)]
  assert split.lines.tolist() == [1, 1, 1, 2] and r.split_into == 3
  with pytest.raises(jd.DataError, match=r"<records> row 1: .*11 tokens"):
    jd.truncate(ds, 4, "error")


def test_truncation_that_removes_the_completion_is_counted(tok):
  ds = jd.load([{"prompt": "a long prompt", "completion": "x"},
                {"prompt": "p", "completion": "ok"}], tok, cache_dir=None,
               verbose=False)
  out, r = jd.truncate(ds, 6, "right")
  assert len(out) == 1 and r.skipped_no_targets == 1 and r.truncated == 1
  assert "1 skipped with no loss tokens left" in str(r)
  left, r = jd.truncate(ds, 6, "left")  # keeps the answer
  assert len(left) == 2  # the last seq_len + 1 = 7 tokens
  assert tok.decode(left[0][0]) == "romptx<|endoftext|>"


# --------------------------------------------------------------------- loss


def test_masked_loss_matches_a_hand_computed_mean():
  logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0],
                      [0.0, 0.0, 9.0]]])
  targets = np.array([[0, 2, 1, 1]])
  mask = np.array([[1.0, 0.0, 1.0, 0.0]])
  # Token 0: -log(e^2 / (e^2 + 1 + e^-1)); token 2: -log(e^3 / (e + e^3 + 1)).
  t0 = -(2.0 - np.log(np.exp(2.0) + 1.0 + np.exp(-1.0)))
  t2 = -(3.0 - np.log(np.exp(1.0) + np.exp(3.0) + 1.0))
  got = float(jd.masked_cross_entropy(logits.astype(np.float32), targets,
                                      mask))
  np.testing.assert_allclose(got, (t0 + t2) / 2, rtol=1e-6)
  assert float(jd.masked_cross_entropy(logits, targets, 0 * mask)) == 0.0


# --------------------------------------------------------------- demo data


def test_shipped_demo_data_is_the_generators_output(tok):
  for name, text in _demo_data.render().items():
    with open(os.path.join(_demo_data.HERE, name), encoding="utf-8") as f:
      assert f.read() == text, f"{name}: rerun python -m jlora.data._demo_data"
  chats = jd.load(jd.demo_path("messages"), tok, cache_dir=None,
                  verbose=False)
  pc = jd.load(jd.demo_path("prompt_completion"), tok, cache_dir=None,
               verbose=False)
  assert len(chats) == len(pc) == _demo_data.NUM_EXAMPLES
  assert (chats.format, pc.format) == ("messages", "prompt_completion")
  # Loss tokens are the answers: far fewer than all tokens, never none.
  for ds in (chats, pc):
    per = np.add.reduceat(ds.mask, ds.offsets[:-1])
    assert per.min() > 0 and ds.mask.mean() < 0.5


def test_import_jlora_does_not_load_the_data_stack():
  import subprocess
  import sys
  code = ("import sys, jlora; bad = [m for m in ('jlora.data', 'grain',"
          " 'transformers', 'torch', 'jlora.finetune') if m in sys.modules];"
          " assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
