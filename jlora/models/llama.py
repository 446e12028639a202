"""The Llama-family names of `jlora.models.decoder`, kept for existing imports.

`LlamaForCausalLM` is `CausalLM`: one decoder runs every supported family.
"""

from jlora.models.decoder import (  # noqa: F401
  ATTENTION_IMPLS,
  CHECKPOINT_NAMES,
  REMAT_POLICIES,
  Attention,
  CausalLM,
  DecoderLayer,
  KVCache,
  LlamaForCausalLM,
  MLP,
  RMSNorm,
  document_positions,
  init_cache,
  remat_policy,
)
