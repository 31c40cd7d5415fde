"""dense: one set of weights for every token (the plain Qwen2 layer; the official `Qwen2DecoderLayer`)."""
from bagel_jax.models import qwen2
from bagel_jax.models.variants import Experts, Variant


def mlp_params(lc) -> float:
  return 3 * lc.hidden_size * lc.intermediate_size


def post_attention(c, x, routing, valid):
  del routing, valid
  lc = c.llm
  h = qwen2.ExpertRMSNorm(1, lc.hidden_size, qwen2.EMBED, lc.rms_norm_eps, name="post_attention_layernorm")([x])[0]
  return qwen2.SwiGLU(c, 1, name="mlp")([h])[0], {}


VARIANT = Variant("dense", Experts(attn=1, mlp_norm=1, mlp=1, final_norm=1), "Qwen2DecoderLayer", mlp_params,
                  post_attention)
