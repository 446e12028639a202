"""Flax (linen) decoder-only causal LMs that load HuggingFace checkpoints.

Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and the
Mixture-of-Experts Mixtral and Qwen3-MoE, one decoder (`CausalLM`) whose
family differences are `ModelConfig` fields.

Examples:
  >>> from jlora.models import from_pretrained, generate
  >>> model, params = from_pretrained("Qwen/Qwen2.5-0.5B", dtype=jnp.bfloat16)
  >>> tokens = generate(model, params, prompt_ids, max_new_tokens=32)
"""

from jlora.models import sharding
from jlora.models.config import ModelConfig, RopeConfig
from jlora.models.generate import generate, sample_logits
from jlora.models.decoder import (
  CHECKPOINT_NAMES,
  REMAT_POLICIES,
  CausalLM,
  KVCache,
  LlamaForCausalLM,
  document_positions,
  init_cache,
  remat_policy,
)
from jlora.models.losses import causal_lm_loss, chunked_cross_entropy
from jlora.models.memory import MemoryPlan, plan_memory
from jlora.models._moe import load_balancing_loss
from jlora.models.export import save_pretrained, to_hf_config
from jlora.models.loading import (
  CheckpointMismatchError,
  from_config,
  from_pretrained,
  from_state_dict,
  load_tokenizer,
)

__all__ = [
  "CHECKPOINT_NAMES",
  "REMAT_POLICIES",
  "CausalLM",
  "causal_lm_loss",
  "chunked_cross_entropy",
  "document_positions",
  "remat_policy",
  "CheckpointMismatchError",
  "KVCache",
  "LlamaForCausalLM",
  "MemoryPlan",
  "ModelConfig",
  "RopeConfig",
  "from_config",
  "from_pretrained",
  "from_state_dict",
  "generate",
  "init_cache",
  "load_balancing_loss",
  "load_tokenizer",
  "plan_memory",
  "sample_logits",
  "save_pretrained",
  "sharding",
  "to_hf_config",
]
