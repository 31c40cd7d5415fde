"""mot (BAGEL): every LLM parameter is duplicated into a hard-routed generation expert; und and gen tokens
share one joint attention (the official `Qwen2MoTDecoderLayer`)."""
from bagel_jax.models import qwen2
from bagel_jax.models.variants import Experts, Variant, dense


def post_attention(c, x, routing, valid):
  del valid
  lc = c.llm
  hs = qwen2.ExpertRMSNorm(2, lc.hidden_size, qwen2.EMBED, lc.rms_norm_eps, name="post_attention_layernorm")(
      routing.dispatch(x, 2))
  return routing.combine(qwen2.stop_und(qwen2.SwiGLU(c, 2, name="mlp")(hs), c.freeze_und)), {}


# hard routing: each token runs one expert's layer, so the active MLP is a dense layer's
VARIANT = Variant("mot", Experts(attn=2, mlp_norm=2, mlp=2, final_norm=2), "Qwen2MoTDecoderLayer",
                  dense.mlp_params, post_attention)
