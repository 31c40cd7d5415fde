"""moe: only the FFN (and the final norm) is duplicated into a hard-routed generation expert; attention and
its norms are shared (the official `Qwen2MoEDecoderLayer`)."""
from bagel_jax.models import qwen2
from bagel_jax.models.variants import Experts, Variant, dense


def post_attention(c, x, routing, valid):
  del valid
  lc = c.llm
  h = qwen2.ExpertRMSNorm(1, lc.hidden_size, qwen2.EMBED, lc.rms_norm_eps, name="post_attention_layernorm")([x])[0]
  ys = qwen2.SwiGLU(c, 2, name="mlp")(routing.dispatch(h, 2))
  return routing.combine(qwen2.stop_und(ys, c.freeze_und)), {}


# hard routing: each token runs one of the two FFNs, so the active MLP is a dense layer's
VARIANT = Variant("moe", Experts(attn=1, mlp_norm=1, mlp=2, final_norm=2), "Qwen2MoEDecoderLayer",
                  dense.mlp_params, post_attention)
