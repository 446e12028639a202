"""jlora.models.generate against transformers' `generate` and sampling maths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import TINY_HF  # noqa: E402

from jlora.models import (  # noqa: E402
  LlamaForCausalLM,
  ModelConfig,
  from_state_dict,
  generate,
  sample_logits,
)

TINY = dict(TINY_HF, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
  "mistral_window": (
    "MistralConfig",
    "MistralForCausalLM",
    {"sliding_window": 5},
  ),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
  "qwen3_tied": (
    "Qwen3Config",
    "Qwen3ForCausalLM",
    {"head_dim": 16, "tie_word_embeddings": True},
  ),
}


def make(family: str, scan_layers=False):
  config_cls, model_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**TINY, **extra})
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  hf = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      # Large weights make the next-token choice decisive, so float32 rounding
      # cannot flip it.
      p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
  model = LlamaForCausalLM(ModelConfig.from_hf(config), scan_layers=scan_layers)
  return hf, model, from_state_dict(model, hf.state_dict())


def hf_generate(hf, ids, n, mask=None, **kw):
  with torch.no_grad():
    out = hf.generate(
      torch.tensor(ids),
      attention_mask=None if mask is None else torch.tensor(mask),
      max_new_tokens=n,
      do_sample=False,
      **kw,
    )
  return out.numpy()


PROMPTS = np.random.RandomState(1).randint(0, 128, (2, 5))


@pytest.mark.parametrize(
  "family, scan_layers",
  [
    ("llama", False),
    ("mistral_window", True),
    ("qwen2", False),
    ("qwen3_tied", True),
  ],
)
def test_greedy_matches_transformers(family, scan_layers):
  hf, model, params = make(family, scan_layers)
  # 5 + 7 tokens exceed Mistral's window of 5, so the cache path must apply it.
  got = generate(model, params, jnp.asarray(PROMPTS), max_new_tokens=7)
  assert got.shape == (2, 12)
  np.testing.assert_array_equal(np.asarray(got), hf_generate(hf, PROMPTS, 7))


def test_left_padded_batch_matches_transformers():
  hf, model, params = make("qwen2")
  ids = PROMPTS.copy()
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  ids[0, :2] = 0
  got = generate(
    model,
    params,
    jnp.asarray(ids),
    max_new_tokens=6,
    attention_mask=jnp.asarray(mask),
  )
  expected = hf_generate(hf, ids, 6, mask=mask, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Row 0 equals its unpadded prompt generated alone.
  alone = generate(model, params, jnp.asarray(ids[:1, 2:]), max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(got[0, 2:]), np.asarray(alone[0]))


def test_eos_stops_row_and_pads():
  hf, model, params = make("llama")
  free = np.asarray(
    generate(model, params, jnp.asarray(PROMPTS), max_new_tokens=6)
  )
  eos = int(free[0, 7])  # row 0's third new token
  assert eos not in free[0, :7] and eos not in free[1, :8]
  pad = int(np.setdiff1d(np.arange(128), free)[0])
  got = np.asarray(
    generate(
      model,
      params,
      jnp.asarray(PROMPTS),
      max_new_tokens=6,
      eos_token_id=eos,
      pad_token_id=pad,
    )
  )
  ones = np.ones_like(PROMPTS)
  expected = hf_generate(
    hf, PROMPTS, 6, mask=ones, eos_token_id=eos, pad_token_id=pad
  )
  width = expected.shape[1]  # HF stops early once every row is done
  np.testing.assert_array_equal(got[:, :width], expected)
  assert got[0, 7] == eos and (got[0, 8:] == pad).all()
  np.testing.assert_array_equal(got[1], free[1])


def test_apply_fn_is_used():
  _, model, params = make("llama")

  def biased(variables, *args, **kw):
    logits, cache = model.apply(variables, *args, **kw)
    return logits.at[..., 42].add(1e4), cache

  got = generate(
    model, params, jnp.asarray(PROMPTS), max_new_tokens=4, apply_fn=biased
  )
  assert (np.asarray(got[:, 5:]) == 42).all()


def test_ids_past_the_vocabulary_are_refused():
  _, model, params = make("llama")
  vocab = model.config.vocab_size
  bad = np.array(PROMPTS)
  bad[1, 2] = vocab
  with pytest.raises(ValueError, match=rf"ids in \[\d+, {vocab}\] but the"
                     rf" model's vocabulary has {vocab}"):
    generate(model, params, jnp.asarray(bad), max_new_tokens=2)
  bad[1, 2] = -1
  with pytest.raises(ValueError, match=r"ids in \[-1, "):
    generate(model, params, jnp.asarray(bad), max_new_tokens=2)


def test_lora_via_wrap_matches_merged():
  jlora = pytest.importorskip("jlora")
  _, model, params = make("qwen2", scan_layers=True)
  lp = jlora.apply(
    params, rank=4, targets="(q_proj|v_proj)/kernel", key=jax.random.key(0)
  )
  # A visible adapter: nonzero b on every node.
  nodes = jax.tree.leaves(lp, is_leaf=lambda x: isinstance(x, jlora.LoRA))
  keys = iter(jax.random.split(jax.random.key(1), len(nodes)))
  lp = jax.tree.map(
    lambda n: (
      dataclasses.replace(n, b=0.5 * jax.random.normal(next(keys), n.b.shape))
      if isinstance(n, jlora.LoRA)
      else n
    ),
    lp,
    is_leaf=lambda x: isinstance(x, jlora.LoRA),
  )
  wrapped = generate(
    model,
    lp,
    jnp.asarray(PROMPTS),
    max_new_tokens=5,
    apply_fn=jlora.wrap(model.apply),
  )
  merged_params = jlora.merge(lp)
  merged = generate(
    model, merged_params, jnp.asarray(PROMPTS), max_new_tokens=5
  )
  np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(merged))

  # The adapter is not a no-op, so equality above says apply_fn really carried
  # it.
  def q(t):
    return t["model"]["layers"]["self_attn"]["q_proj"]["kernel"]

  assert (
    np.abs(np.asarray(q(merged_params)) - np.asarray(q(params))).max() > 1e-2
  )


def test_sampling_is_keyed():
  _, model, params = make("llama")
  run = lambda k: np.asarray(  # noqa: E731
    generate(
      model,
      params,
      jnp.asarray(PROMPTS),
      max_new_tokens=8,
      temperature=5.0,
      key=jax.random.key(k),
    )
  )
  np.testing.assert_array_equal(run(0), run(0))
  assert (run(0) != run(1)).any()
  with pytest.raises(ValueError, match="pass key="):
    generate(
      model, params, jnp.asarray(PROMPTS), max_new_tokens=2, temperature=1.0
    )


def _empirical(logits, n=20000, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.jit(jax.vmap(lambda k: sample_logits(logits[None], k, **kw)[0]))(
    keys
  )
  return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_sampling_temperature_distribution():
  freq = _empirical(jnp.asarray(LOGITS), temperature=2.0)
  np.testing.assert_allclose(
    freq, _softmax(LOGITS.astype(np.float64) / 2.0), atol=0.015
  )


def test_sampling_top_k_distribution():
  freq = _empirical(jnp.asarray(LOGITS), temperature=1.0, top_k=3)
  expected = _softmax(LOGITS[:3].astype(np.float64))
  np.testing.assert_allclose(freq[:3], expected, atol=0.015)
  assert freq[3:].sum() == 0


def test_sampling_top_p_distribution():
  # p = 0.57, 0.21, 0.13, ...: top_p=0.75 keeps the first 2 tokens.
  p = _softmax(LOGITS.astype(np.float64))
  assert p[0] < 0.75 <= p[0] + p[1]
  freq = _empirical(jnp.asarray(LOGITS), temperature=1.0, top_p=0.75)
  np.testing.assert_allclose(freq[:2], p[:2] / p[:2].sum(), atol=0.015)
  assert freq[2:].sum() == 0


def test_greedy_top_k_one_and_tiny_top_p_are_argmax_per_row():
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 10), jnp.float32)
  argmax = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(sample_logits(logits, None), argmax)
  key = jax.random.key(0)
  np.testing.assert_array_equal(
    sample_logits(logits, key, temperature=1.0, top_k=1), argmax
  )
  np.testing.assert_array_equal(
    sample_logits(logits, key, temperature=1.0, top_p=1e-6), argmax
  )
