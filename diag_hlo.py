import functools, os, re, jax, jax.numpy as jnp, jlora
from jlora.models import LlamaForCausalLM, ModelConfig
out = os.environ.get("OUT", "/tmp")
cfg = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=2, num_heads=32, num_kv_heads=4, rms_norm_eps=1e-5, max_position_embeddings=1024)
m = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, True, "none", "auto")
x = jnp.zeros((8, 1024), jnp.int32)
p = jax.jit(lambda k: m.init(k, x[:1, :8])["params"])(jax.random.key(0))
lp = jlora.apply(p, rank=16, alpha=32, key=jax.random.key(1), targets="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
fw = jlora.wrap(m.apply)
for name, tree in (("lora", lp), ("base", p)):
  f = jax.jit(lambda t, x: fw({"params": t}, x, return_hidden=True)[:, -1])
  txt = f.lower(tree, x).compile().as_text()
  open(f"{out}/{name}.hlo.txt", "w").write(txt)
  calls = re.findall(r'custom_call_target="([^"]+)"', txt)
  fus = re.findall(r'kind=k(\w+)', txt)
  print(name, {c: calls.count(c) for c in set(calls)}, {k: fus.count(k) for k in set(fus)})
  print(name, "beta!=0 gemms:", len(re.findall(r'"beta":[1-9]', txt)), "triton gemm fusions:", txt.count('"kind":"__triton_gemm"'))
