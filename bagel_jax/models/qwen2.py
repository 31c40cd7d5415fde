"""Qwen2 decoder with BAGEL's layer variants (models/variants/: dense, moe, mot, moe_topk, one module each).

Hard-routed variants store the two weight sets (und = index 0, gen = index 1) stacked on a leading
`modality` axis; the official `X` / `X_moe_gen` pairs map to [0] / [1]. All tokens share one joint attention
under the generalized causal mask, through the one attention registry (`kernels.attention`). Parameter names
follow `modeling/bagel/qwen2_navit.py`.

One decoder layer serves training and cached decoding (the official `forward_inference`), as MaxText's model
modes do: `DecoderLayer(x, ..., cache=None)` runs a packed row; with `cache=(k_cache, v_cache, cache_meta)` the
block's queries attend to the cached keys plus its own, and the layer also returns the block's K (after the
k-norm and RoPE) and V for the cache.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bagel_jax.kernels import attention as attention_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import layers, variants
from bagel_jax.models.config import BagelConfig
from bagel_jax.models.routing import Routing

EMBED = "embed"


# ----------------------------------------------------------------------------------------------------------
# RoPE (HF Llama/Qwen2: split-half rotation, fp32 tables cast to the activation dtype).
# ----------------------------------------------------------------------------------------------------------

def rope_tables(positions, head_dim: int, theta: float, dtype) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """positions [B, L] -> cos, sin [B, L, head_dim]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
  """x [B, L, H, D]; cos/sin [B, L, D]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------------------------------------
# Expert-stacked building blocks: each takes one buffer per expert and returns one output per expert.
# ----------------------------------------------------------------------------------------------------------

class ExpertLinear(nn.Module):
  """`num` weight sets stacked on a leading `modality` axis (none when num == 1)."""
  num: int
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  in_axes: Tuple[str, ...]
  out_axes: Tuple[str, ...]
  use_bias: bool
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, xs: Sequence[jnp.ndarray]):
    lead, lead_axes = ((self.num,), ("modality",)) if self.num > 1 else ((), ())
    pdt, dt = layers.dtype_of(self.param_dtype), layers.dtype_of(self.dtype)
    kernel = layers.param(self, "kernel", layers.normal_init, lead + self.in_shape + self.out_shape,
                          lead_axes + self.in_axes + self.out_axes, pdt)
    bias = (layers.param(self, "bias", layers.zeros_init, lead + self.out_shape, lead_axes + self.out_axes, pdt)
            if self.use_bias else None)
    outs = []
    for e, x in enumerate(xs):
      k = kernel[e] if self.num > 1 else kernel
      y = layers.flat_matmul(x.astype(dt), k.astype(dt), len(self.in_shape))
      if bias is not None:
        y = y + (bias[e] if self.num > 1 else bias).astype(dt)
      outs.append(y)
    return outs


class ExpertRMSNorm(nn.Module):
  num: int
  features: int
  axis_name: str
  eps: float

  @nn.compact
  def __call__(self, xs: Sequence[jnp.ndarray]):
    lead, lead_axes = ((self.num,), ("modality",)) if self.num > 1 else ((), ())
    w = layers.param(self, "scale", layers.ones_init, lead + (self.features,), lead_axes + (self.axis_name,),
                     jnp.float32)
    return [layers.rms_norm(x, w[e] if self.num > 1 else w, self.eps) for e, x in enumerate(xs)]


def stop_und(xs, freeze: bool):
  """`freeze_und`: detach the und-expert buffer (index 0) so no gradient reaches und parameters."""
  if freeze and len(xs) == 2:
    return [jax.lax.stop_gradient(xs[0]), xs[1]]
  return list(xs)


# ----------------------------------------------------------------------------------------------------------
# Attention and MLP blocks.
# ----------------------------------------------------------------------------------------------------------

def expert_qkv(c: BagelConfig, num: int, hs):
  """Per-expert q/k/v projections (+ QK-RMSNorm) of the expert buffers `hs` (inside `Attention`)."""
  lc = c.llm
  kw = dict(num=num, dtype=c.dtype, param_dtype=c.param_dtype)
  d = (lc.hidden_size,)
  q = ExpertLinear(in_shape=d, out_shape=(lc.num_heads, lc.head_dim), in_axes=(EMBED,),
                   out_axes=("heads", "head_dim"), use_bias=True, name="q_proj", **kw)(hs)
  k = ExpertLinear(in_shape=d, out_shape=(lc.num_kv_heads, lc.head_dim), in_axes=(EMBED,),
                   out_axes=("kv_heads", "head_dim"), use_bias=True, name="k_proj", **kw)(hs)
  v = ExpertLinear(in_shape=d, out_shape=(lc.num_kv_heads, lc.head_dim), in_axes=(EMBED,),
                   out_axes=("kv_heads", "head_dim"), use_bias=True, name="v_proj", **kw)(hs)
  if lc.qk_norm:
    q = ExpertRMSNorm(num, lc.head_dim, "head_dim", lc.rms_norm_eps, name="q_norm")(q)
    k = ExpertRMSNorm(num, lc.head_dim, "head_dim", lc.rms_norm_eps, name="k_norm")(k)
  return q, k, v


def expert_o_proj(c: BagelConfig, num: int, routing: Routing, out):
  """The attention output projection of each expert over its dispatched rows (inside a compact `__call__`)."""
  lc = c.llm
  return ExpertLinear(in_shape=(lc.num_heads, lc.head_dim), out_shape=(lc.hidden_size,),
                      in_axes=("heads", "head_dim"), out_axes=(EMBED,), use_bias=False, name="o_proj", num=num,
                      dtype=c.dtype, param_dtype=c.param_dtype)(routing.dispatch(out, num))


class Attention(nn.Module):
  """Joint attention of all tokens; `cache` = (k_cache, v_cache, cache_meta): the queries (`meta`) attend to the
  cached keys plus the block's own, and (out, k, v) is returned."""
  config: BagelConfig
  num: int

  @nn.compact
  def __call__(self, hs, routing: Routing, cos, sin, meta: mask_lib.TokenMeta, cache=None):
    c, lc = self.config, self.config.llm
    q, k, v = expert_qkv(c, self.num, hs)
    q, k, v = (stop_und(t, c.freeze_und) for t in (q, k, v))
    q, k, v = routing.combine(q), routing.combine(k), routing.combine(v)
    q = layers.constrain(apply_rope(q, cos, sin), ("activation_batch", "activation_length", "activation_heads",
                                                  "head_dim"))
    k = layers.constrain(apply_rope(k, cos, sin), ("activation_batch", "activation_length",
                                                  "activation_kv_heads", "head_dim"))
    v = layers.constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))
    scale = 1.0 / math.sqrt(lc.head_dim)
    if cache is None:
      out = attention_lib.attention(q, k, v, meta, meta, impl=c.attention_impl, scale=scale)
    else:
      out = attention_lib.attention_with_cache(q, k, v, meta, *cache, impl=c.attention_impl, scale=scale)
    out = checkpoint_name(out, "attn_out")
    o = stop_und(expert_o_proj(c, self.num, routing, out), c.freeze_und)
    return o if cache is None else (o, k, v)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), per expert buffer."""
  config: BagelConfig
  num: int

  @nn.compact
  def __call__(self, hs):
    c, lc = self.config, self.config.llm
    kw = dict(num=self.num, dtype=c.dtype, param_dtype=c.param_dtype, use_bias=False)
    d, f = (lc.hidden_size,), (lc.intermediate_size,)
    gate = ExpertLinear(in_shape=d, out_shape=f, in_axes=(EMBED,), out_axes=("mlp",), name="gate_proj", **kw)(hs)
    up = ExpertLinear(in_shape=d, out_shape=f, in_axes=(EMBED,), out_axes=("mlp",), name="up_proj", **kw)(hs)
    act = [layers.constrain(jax.nn.silu(g) * u, ("activation_batch", "activation_length", "activation_mlp"))
           for g, u in zip(gate, up)]
    return ExpertLinear(in_shape=f, out_shape=d, in_axes=("mlp",), out_axes=(EMBED,), name="down_proj",
                        **kw)(act)


# ----------------------------------------------------------------------------------------------------------
# Decoder layer and stack.
# ----------------------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
  """One layer of the variant: (x, aux losses) for a packed row, or (x, (k, v)) for a block decoded against
  `cache` (see the module docstring)."""
  config: BagelConfig

  @nn.compact
  def __call__(self, x, routing: Routing, cos, sin, meta: mask_lib.TokenMeta, cache=None):
    c, lc = self.config, self.config.llm
    variant = variants.get(lc.layer_variant)
    n = variant.experts.attn
    act_axes = ("activation_batch", "activation_length", "activation_embed")
    x = checkpoint_name(layers.constrain(x, act_axes), "layer_input")  # what "offload_layer_inputs" sends to host
    hs = ExpertRMSNorm(n, lc.hidden_size, EMBED, lc.rms_norm_eps, name="input_layernorm")(routing.dispatch(x, n))
    o = Attention(c, n, name="self_attn")(hs, routing, cos, sin, meta, cache)
    if cache is not None:
      o, k, v = o
    x = x + routing.combine(o)

    y, aux = variant.post_attention(c, x, routing, meta.document > 0)
    y = checkpoint_name(y, "mlp_out")
    x = layers.constrain(x + y, act_axes)
    return (x, aux) if cache is None else (x, (k, v))


class Qwen2LM(nn.Module):
  """Token embedding, decoder stack, routed final norm and an untied LM head."""
  config: BagelConfig

  def setup(self):
    c, lc = self.config, self.config.llm
    self.embed_tokens = nn.Embed(
        lc.vocab_size, lc.hidden_size, dtype=layers.dtype_of(c.dtype), param_dtype=layers.dtype_of(c.param_dtype),
        embedding_init=nn.with_logical_partitioning(layers.normal_init, ("vocab", EMBED)))
    block = layers.maybe_remat(DecoderLayer, c.remat_policy)
    if c.scan_layers:
      # DecoderLayer already has the (carry, *broadcast) -> (carry, per-layer aux) form nn.scan wants.
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 4, length=lc.num_layers, unroll=min(c.scan_unroll, lc.num_layers),
          metadata_params={nn.PARTITION_NAME: "layers"})(c)
    else:
      self.layers = [block(c, name=f"layers_{i}") for i in range(lc.num_layers)]
    self.norm = ExpertRMSNorm(variants.get(lc.layer_variant).experts.final_norm, lc.hidden_size, EMBED,
                              lc.rms_norm_eps)
    self.lm_head = LMHead(c)

  def embed(self, ids):
    return self.embed_tokens(ids)

  def __call__(self, x, routing: Routing, positions, meta: mask_lib.TokenMeta):
    """x: embedded row [B, L, D] -> final-normed hidden states [B, L, D], per-layer aux (summed)."""
    lc = self.config.llm
    cos, sin = rope_tables(positions, lc.head_dim, lc.rope_theta, layers.dtype_of(self.config.dtype))
    if self.config.scan_layers:
      x, aux = self.layers(x, routing, cos, sin, meta)
      aux = jax.tree.map(jnp.sum, aux)
    else:
      aux_list = []
      for layer in self.layers:
        x, a = layer(x, routing, cos, sin, meta)
        aux_list.append(a)
      aux = jax.tree.map(lambda *a: sum(a), *aux_list) if aux_list and aux_list[0] else {}
    num = variants.get(lc.layer_variant).experts.final_norm
    h = routing.combine(stop_und(self.norm(routing.dispatch(x, num)), self.config.freeze_und))
    return h, aux

  def text_logits(self, ids):
    """Plain causal LM over text ids [B, L] (one document per row, und expert): for parity with HF Qwen2."""
    b, l = ids.shape
    ones = jnp.ones((b, l), jnp.int32)
    meta = mask_lib.TokenMeta.from_row(ones, ones, jnp.zeros_like(ones) + mask_lib.CAUSAL)
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    h, _ = self(self.embed(ids), Routing.all_und(b, l, self.config.routing == "dense"), positions, meta)
    return self.logits(h)

  def ce_loss(self, h, targets, weights):
    return self.lm_head(h, targets, weights)

  def logits(self, h):
    return self.lm_head(h)


class LMHead(nn.Module):
  """Untied `lm_head` [D, V]. With targets, returns (weighted CE sum, weight sum) without keeping the
  [B, N, V] logits alive beyond one chunk when `ce_chunk_size` > 0."""
  config: BagelConfig

  @nn.compact
  def __call__(self, h, targets=None, weights=None):
    c, lc = self.config, self.config.llm
    kernel = layers.param(self, "kernel", layers.normal_init, (lc.hidden_size, lc.vocab_size), (EMBED, "vocab"),
                          layers.dtype_of(c.param_dtype))
    dt = layers.dtype_of(c.dtype)

    def logits_of(hc):
      return jnp.einsum("bnd,dv->bnv", hc.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32)

    if targets is None:
      return logits_of(h)

    def ce_of(hc, tc, wc):
      lg = logits_of(hc)
      lse = jax.nn.logsumexp(lg, axis=-1)
      tgt = jnp.take_along_axis(lg, tc[..., None], axis=-1)[..., 0]
      return jnp.sum((lse - tgt) * wc)

    n = h.shape[1]
    chunk = c.ce_chunk_size
    if chunk <= 0 or chunk >= n:
      return ce_of(h, targets, weights), jnp.sum(weights)
    pad = (-n) % chunk
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tp = jnp.pad(targets, ((0, 0), (0, pad)))
    wp = jnp.pad(weights, ((0, 0), (0, pad)))
    nch = (n + pad) // chunk
    split = lambda a: jnp.moveaxis(a.reshape((a.shape[0], nch, chunk) + a.shape[2:]), 1, 0)
    per_chunk = jax.lax.map(lambda args: jax.checkpoint(ce_of)(*args), (split(hp), split(tp), split(wp)))
    return jnp.sum(per_chunk), jnp.sum(weights)
