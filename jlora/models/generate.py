"""Autoregressive generation: preallocated KV cache, jitted decode loop."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora.models.decoder import CausalLM, init_cache


def sample_logits(
  logits: jax.Array,
  key: jax.Array | None,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """One token per row of `logits` (B, V): argmax at temperature 0, else drawn.

  Sampling draws from softmax(logits / temperature) restricted to the `top_k`
  largest logits, then to the smallest set of tokens whose probability reaches
  `top_p` (nucleus sampling; the most likely token is always kept), in the order
  transformers applies them.

  Returns:
    (B,) int32 token ids.

  References:
    Holtzman et al., "The Curious Case of Neural Text Degeneration", 2019
    (top-p).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError(
      "temperature > 0 samples tokens; pass key=jax.random.key(seed)"
    )
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None:
    kth = lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Drop a token when the tokens before it already reach top_p.
    drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
    drop = (
      jnp.zeros_like(drop_sorted)
      .at[jnp.arange(logits.shape[0])[:, None], order]
      .set(drop_sorted)
    )
    logits = jnp.where(drop, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
  model: CausalLM,
  params: Any,
  input_ids: jax.Array,
  *,
  max_new_tokens: int,
  key: jax.Array | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  attention_mask: jax.Array | None = None,
  eos_token_id: int | None = None,
  pad_token_id: int | None = None,
  apply_fn: Callable[..., Any] | None = None,
) -> jax.Array:
  """Continues `input_ids` (B, T) by `max_new_tokens`; returns (B, T + new).

  The prompt fills a KV cache of T + max_new_tokens slots in one forward pass;
  each new token then costs one single-token pass inside a jitted `lax.scan`.
  Greedy when `temperature == 0`, otherwise sampled with `key` (see
  `sample_logits`).

  Args:
    model, params: the model and its parameter tree (`model.apply` receives
      `{"params": params}`).
    input_ids: (B, T) prompts of equal length. Left-padded prompts work when
      `attention_mask` (B, T) marks the real tokens: rope positions then count
      real tokens only, as transformers does. Right padding is not supported.
    eos_token_id: once a row emits it, the row continues with `pad_token_id`
      (default eos).
    apply_fn: replaces `model.apply`, e.g. `jlora.wrap(model.apply)` to decode
      with LoRA parameters without merging them; called as
      `apply_fn({"params": params}, ids, positions=, attention_mask=, cache=)`
      and must return `(logits, cache)`.

  Raises:
    ValueError: `input_ids` outside [0, vocab_size) (a tokenizer that is not
      the model's; the embedding lookup would give NaN logits), or
      `temperature > 0` without a `key`.

  Examples:
    >>> out = generate(model, params, prompt, max_new_tokens=32)
    >>> out = generate(model, lora_params, prompt, max_new_tokens=32,
    ...                apply_fn=jlora.wrap(model.apply))
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  vocab = model.config.vocab_size
  if (input_ids.size and not isinstance(input_ids, jax.core.Tracer)
      and input_ids.is_fully_addressable):
    lo, hi = (int(v) for v in jax.device_get((input_ids.min(),
                                              input_ids.max())))
    if lo < 0 or hi >= vocab:
      # Past the embedding, a lookup gives NaN logits, not an error.
      raise ValueError(
        f"input_ids hold ids in [{lo}, {hi}] but the model's vocabulary has"
        f" {vocab}; tokenize with the model's own tokenizer")
  if max_new_tokens <= 0:
    return input_ids
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if eos_token_id is not None and pad_token_id is None:
    pad_token_id = eos_token_id
  if key is None:
    if temperature != 0.0:
      raise ValueError(
        "temperature > 0 samples tokens; pass key=jax.random.key(seed)"
      )
    key = jax.random.key(0)  # unused by greedy decoding
  return _generate(
    params,
    input_ids,
    jnp.asarray(attention_mask, jnp.int32),
    key,
    model=model,
    apply_fn=model.apply if apply_fn is None else apply_fn,
    max_new_tokens=max_new_tokens,
    sampling=(float(temperature), top_k, top_p),
    eos_pad=(eos_token_id, pad_token_id),
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "apply_fn",
    "max_new_tokens",
    "sampling",
    "eos_pad",
  ),
)
def _generate(
  params,
  input_ids,
  attention_mask,
  key,
  *,
  model,
  apply_fn,
  max_new_tokens,
  sampling,
  eos_pad,
):
  temperature, top_k, top_p = sampling
  eos, pad = eos_pad
  batch, prompt_len = input_ids.shape
  total = prompt_len + max_new_tokens
  # Every slot after the prompt will hold a generated token, so mark it valid up
  # front; causality hides the slots not written yet.
  kv_mask = jnp.concatenate(
    [attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1
  )
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  variables = {"params": params}
  pick = functools.partial(
    sample_logits, temperature=temperature, top_k=top_k, top_p=top_p
  )

  cache = init_cache(model, batch, total)
  logits, cache = apply_fn(
    variables,
    input_ids,
    positions=positions,
    attention_mask=kv_mask,
    cache=cache,
  )
  key, sub = jax.random.split(key)
  token = pick(logits[:, -1], sub)
  done = jnp.zeros((batch,), bool) if eos is None else token == eos
  next_pos = positions[:, -1] + 1

  def advance(logits, state):
    """The next token from the fed token's logits (B, V)."""
    _, pos, cache, done, key = state
    key, sub = jax.random.split(key)
    new = pick(logits, sub)
    if eos is not None:
      new = jnp.where(done, pad, new)
      done = done | (new == eos)
    return (new, pos + 1, cache, done, key), new

  def step(state, _):
    token, pos, cache, done, key = state
    logits, cache = apply_fn(
      variables,
      token[:, None],
      positions=pos[:, None],
      attention_mask=kv_mask,
      cache=cache,
    )
    return advance(logits[:, -1], (token, pos, cache, done, key))

  state = (token, next_pos, cache, done, key)
  pieces = [input_ids, token[:, None]]
  left = max_new_tokens - 1
  cross = _longrope_crossing(model.config, prompt_len, total)
  if cross is not None:
    # LongRoPE (Phi-3) switches from short to long factors once the sequence
    # passes original_max_position_embeddings; as transformers' generate
    # does, the cache is then rebuilt by one forward pass over the whole
    # sequence with the long factors, so that every later token sees the
    # same keys as a full forward pass would.
    before = cross - prompt_len
    state, out = lax.scan(step, state, None, length=before)
    pieces.append(out.T)
    seq = jnp.concatenate(pieces, axis=1)  # (B, cross + 1)
    seq_pos = jnp.concatenate(
      [positions, next_pos[:, None] + jnp.arange(before + 1)], axis=1
    )
    logits, cache = apply_fn(
      variables,
      seq,
      positions=seq_pos,
      attention_mask=kv_mask,
      cache=init_cache(model, batch, total),
    )
    token, pos, _, done, key = state
    state, new = advance(logits[:, -1], (token, pos, cache, done, key))
    pieces.append(new[:, None])
    left -= before + 1
  _, rest = lax.scan(step, state, None, length=left)
  pieces.append(rest.T)
  return jnp.concatenate(pieces, axis=1)


def _longrope_crossing(config, prompt_len: int, total: int) -> int | None:
  """The slot whose token first makes a LongRoPE sequence longer than
  original_max_position_embeddings, when decoding (not the prompt) gets
  there; None otherwise."""
  ropes = [r for r in (config.rope, config.local_rope)
           if r is not None and r.rope_type == "longrope"]
  if not ropes:
    return None
  cross = ropes[0].original_max_position_embeddings
  return cross if prompt_len <= cross <= total - 2 else None
