"""jlora-finetune end to end on CPU: outputs that PEFT and transformers load,
exact resume, bad input."""

from __future__ import annotations

import json
import os
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft
from jlora import models
from jlora.finetune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seq-len", "96", "--batch", "4", "--eval-batches", "1",
        "--rank", "4", "--cache-dir", "none"]


def test_demo_run_writes_adapters_that_peft_and_transformers_load(
    tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  out = tmp_path / "run"
  steps, make_steps = [], cli._steps.make_steps
  monkeypatch.setattr(cli._steps, "make_steps", lambda *a, **k: (
      steps.append(make_steps(*a, **k)) or steps[-1]))
  metrics = cli.main([*TINY, "--steps", "30", "--eval-every", "15",
                      "--sample-tokens", "4", "--merged", "--out", str(out)])
  # Static batch shapes: 30 steps and 3 evaluations compiled once each.
  assert steps[0][0]._cache_size() == 1 and steps[0][1]._cache_size() == 1
  assert metrics["loss_after"] < metrics["loss_before"] - 1.0, metrics
  assert metrics["packing"] and metrics["fill"] > 0.5
  assert [s for s, _ in metrics["evals"]] == [0, 15, 30]
  assert json.load(open(out / "metrics.json"))["loss_after"] == (
      metrics["loss_after"])
  assert (out / "loss_curve.png").stat().st_size > 1000

  # The trained adapter on the demo base, three ways: jlora factored, PEFT on
  # the base exported for transformers, and the merged export.
  model, params = models.from_config(cli.DEMO_CONFIG, jax.random.key(0))
  lp = jlora.peft.load(out / "adapter_peft", params)
  ids = np.arange(40)[None] % 256
  want = np.asarray(jax.jit(jlora.wrap(model.apply))({"params": lp},
                                                     jnp.asarray(ids)))
  models.save_pretrained(tmp_path / "base", model, params)
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
  with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter_peft")
  merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
  with torch.no_grad():
    for hf in (with_adapter.eval(), merged.eval()):
      got = hf(torch.tensor(ids)).logits.float().numpy()
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The merged directory serves on its own: the tokenizer and its template.
  tok = transformers.AutoTokenizer.from_pretrained(out / "merged")
  assert tok.chat_template == jlora.data.CHATML_TEMPLATE


class Interrupt(Exception):
  pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
  data = tmp_path / "corpus.txt"
  data.write_text(open(os.path.join(ROOT, "examples", "data",
                                    "tiny_corpus.txt")).read()[:6000])
  flags = [*TINY, "--data", str(data), "--steps", "6", "--eval-every", "3",
           "--sample-tokens", "0", "--dropout", "0.1"]
  whole = cli.main([*flags, "--out", str(tmp_path / "a")])

  make_steps = cli._steps.make_steps

  def failing(*args, **kwargs):  # the process dies during step 5
    train_step, eval_step, forward = make_steps(*args, **kwargs)
    calls = []

    def step(*a):
      calls.append(1)
      if len(calls) == 5:
        raise Interrupt
      return train_step(*a)
    return step, eval_step, forward

  monkeypatch.setattr(cli._steps, "make_steps", failing)
  with pytest.raises(Interrupt):
    cli.main([*flags, "--out", str(tmp_path / "b")])
  monkeypatch.setattr(cli._steps, "make_steps", make_steps)
  with pytest.raises(SystemExit, match="--resume"):
    cli.main([*flags, "--out", str(tmp_path / "b")])
  resumed = cli.main([*flags, "--out", str(tmp_path / "b"), "--resume"])
  assert resumed["evals"] == whole["evals"]
  _, params = models.from_config(cli.DEMO_CONFIG, jax.random.key(0))
  a = jlora.peft.load(tmp_path / "a" / "adapter_peft", params)
  b = jlora.peft.load(tmp_path / "b" / "adapter_peft", params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Plain text is split into pieces, not truncated: nothing is cut.
  assert whole["examples"]["split_into"] > 1
  assert whole["examples"]["tokens_cut"] == 0


@pytest.mark.fast_tier  # the command's one test in the fast tier
def test_bad_data_ends_the_command_naming_file_and_line(tmp_path,
                                                        monkeypatch):
  bad = tmp_path / "chat.jsonl"
  bad.write_text(json.dumps({"messages": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}]}) + "\n"
      + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  monkeypatch.setattr(sys, "argv", ["jlora-finetune", "--data", str(bad),
                                    "--out", str(tmp_path / "o"),
                                    "--cache-dir", "none"])
  with pytest.raises(SystemExit, match=r"error: .*chat\.jsonl:2: .*no"
                     r" assistant turn"):
    cli.run()


def test_console_script_is_registered():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  module, _, name = scripts["jlora-finetune"].partition(":")
  assert module == "jlora.finetune.cli" and getattr(cli, name) is cli.run


def test_hf_checkpoint_with_its_tokenizer_qlora_and_merged_export(tmp_path):
  """The real-use path: --model DIR (transformers checkpoint + BPE tokenizer
  with a chat template), QLoRA, prompt/completion data, --merged."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, decoders, models as tok_models
  from tokenizers import pre_tokenizers, trainers
  t = Tokenizer(tok_models.BPE(unk_token=None))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train([jlora.data.demo_path("prompt_completion")], trainers.BpeTrainer(
      vocab_size=400, special_tokens=["</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t,
                                             eos_token="</s>")
  ckpt = tmp_path / "ckpt"
  tok.save_pretrained(ckpt)
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
      vocab_size=448, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  hf.save_pretrained(ckpt)
  out = tmp_path / "run"
  metrics = cli.main([*TINY, "--model", str(ckpt), "--data",
                      jlora.data.demo_path("prompt_completion"), "--steps",
                      "4", "--eval-every", "4", "--sample-tokens", "2",
                      "--quantize", "nf4", "--lr", "1e-2", "--merged",
                      "--out", str(out)])
  assert metrics["targets"] == "all-linear" and metrics["model"] == str(ckpt)
  # The merged model is the dequantized base (the values the QLoRA forward
  # computes with) plus the trained adapter, merged in float32.
  model, qparams = models.from_pretrained(ckpt, quantize="nf4")
  lp = jlora.peft.load(out / "adapter_peft", qparams)
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), jlora.dequantize(lp))
  ids = jnp.asarray(np.arange(30)[None] % 448)
  want = np.asarray(jax.jit(model.apply)({"params": jlora.merge(f32)}, ids))
  merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
  with torch.no_grad():
    got = merged.eval()(torch.tensor(np.asarray(ids))).logits.float().numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # ... which the QLoRA forward (bf16 matmuls against the 4-bit base) tracks.
  qlora = jax.jit(jlora.wrap(model.apply))({"params": lp}, ids)
  np.testing.assert_allclose(got, np.asarray(qlora), atol=5e-3, rtol=0)
