"""The BAGEL composite: ViT + connector, VAE latents + timestep embedding, the MoT decoder, CE and
rectified-flow losses over one packed batch (`bagel_jax.batch`).

Semantics follow `modeling/bagel/bagel.py::Bagel.forward` (reference §3.2-3.5): x_t = (1-t) x0 + t eps with
t = shift(sigmoid(n)) per image, target v = eps - x0, MSE averaged over channels and summed over noisy tokens,
CE summed over CE positions; both normalised by their global token counts.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.models import layers
from bagel_jax.models.config import BagelConfig
from bagel_jax.models.flux_vae import FluxAutoEncoder, init_vae_params, patchify_latents
from bagel_jax.models.qwen2 import Qwen2LM
from bagel_jax.models.routing import Routing, gather_rows, inverse_index, read_slots, take_rows
from bagel_jax.models.siglip import SiglipViT

Params = Dict[str, Any]
_ACT = ("activation_batch", "activation_length", "activation_embed")


def shift_timesteps(t, shift: float):
  """Timestep shift s*t / (1 + (s-1)*t): identity for s=1, pushes t towards noise for s>1."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """DiT sinusoid of t in [0, 1] (not x1000), cos first."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def noise_latents(x0, t_logit, eps, shift: float):
  """Rectified flow: t = shift(sigmoid(n)) per token (-inf -> 0 = clean), x_t = (1-t) x0 + t eps, target
  v = eps - x0 (t = 1 is pure noise)."""
  t = shift_timesteps(jax.nn.sigmoid(t_logit), shift)
  x_t = (1.0 - t[..., None]) * x0 + t[..., None] * eps
  return x_t, t, eps - x0


def scatter_in_order(x, tokens, is_slot):
  """Writes the k-th row of `tokens` [B, N, D] into the k-th position where `is_slot` [B, L] holds (a gather
  both ways: `routing.read_slots`)."""
  src = jnp.where(is_slot, jnp.cumsum(is_slot, axis=1, dtype=jnp.int32) - 1, -1)
  gathered = read_slots(tokens, inverse_index(src, tokens.shape[1]), src)
  return jnp.where(is_slot[..., None], gathered.astype(x.dtype), x)


class TimestepEmbedder(nn.Module):
  hidden: int
  dtype: str
  param_dtype: str
  freq_dim: int = 256

  @nn.compact
  def __call__(self, t):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Linear((self.freq_dim,), (self.hidden,), ("freq",), ("mlp",), name="mlp_0", **kw)(
        timestep_embedding(t, self.freq_dim))
    return layers.Linear((self.hidden,), (self.hidden,), ("mlp",), ("embed",), name="mlp_2", **kw)(
        jax.nn.silu(h))


class Connector(nn.Module):
  """ViT -> LLM two-layer GELU(tanh) MLP (`MLPconnector`)."""
  in_dim: int
  hidden: int
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Linear((self.in_dim,), (self.hidden,), ("vit_embed",), ("mlp",), name="fc1", **kw)(x)
    return layers.Linear((self.hidden,), (self.hidden,), ("mlp",), ("embed",), name="fc2", **kw)(
        layers.gelu_tanh(h))


class Bagel(nn.Module):
  config: BagelConfig

  def setup(self):
    c = self.config
    d = c.llm.hidden_size
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.llm = Qwen2LM(c)
    self.vit = SiglipViT(c.vit, attention_impl=c.attention_impl, remat_policy=c.remat_policy,
                         scan_layers=c.scan_layers, **kw)
    self.connector = Connector(c.vit.hidden_size, d, **kw)
    self.time_embedder = TimestepEmbedder(d, **kw)
    self.vae2llm = layers.Linear((c.latent_channels,), (d,), ("latent",), ("embed",), **kw)
    self.llm2vae = layers.Linear((d,), (c.latent_channels,), ("embed",), ("latent",),
                                 kernel_init=layers.zeros_init, **kw)
    self.vae = FluxAutoEncoder(c.vae, **kw)

  # -- embeddings ------------------------------------------------------------------------------------------
  # Each embedding output is constrained to batch sharding, as every decoder layer's input is: otherwise XLA
  # propagates the FSDP sharding of vae2llm/connector/timestep weights (embed over fsdp) and keeps the
  # *global* batch of latent tokens replicated per chip (21 GiB twice for the 7B PT step on v5p-256).
  def embed_vit(self, patches, pos, image_ids):
    """ViT tokens -> LLM space: SigLIP (+post-LN) -> connector -> + 2-D sin-cos of (row, col)."""
    c = self.config
    h = self.connector(self.vit(patches, pos, image_ids))
    h = h + layers.sincos_2d_at(pos, c.vit.max_patches_per_side, c.llm.hidden_size).astype(h.dtype)
    return layers.constrain(h, _ACT)

  def embed_latents(self, x_t, t, pos):
    """Noised latent tokens -> LLM space: vae2llm + timestep embedding + 2-D sin-cos position."""
    c = self.config
    pos_emb = layers.sincos_2d_at(pos, c.max_latent_size, c.llm.hidden_size)
    h = self.vae2llm(x_t) + self.time_embedder(t) + pos_emb.astype(layers.dtype_of(c.dtype))
    return layers.constrain(h, _ACT)

  def embed_row(self, batch, latent_emb=None):
    """Assembles a row (a packed training row, or an inference block): text embeddings, ViT embeddings at the
    VIT positions (when the row has ViT tokens) and `latent_emb` at the VAE positions (None: no latents)."""
    x = self.llm.embed(batch["text_ids"])
    if "vit_patches" in batch and batch["vit_patches"].shape[1]:
      vit = self.embed_vit(batch["vit_patches"], batch["vit_pos"], batch["vit_image"])
      x = scatter_in_order(x, vit, batch["modality"] == batch_lib.VIT)
    if latent_emb is not None and latent_emb.shape[1]:
      x = scatter_in_order(x, latent_emb, batch["modality"] == batch_lib.VAE)
    if self.config.freeze_und:
      x = jnp.where((batch["modality"] == batch_lib.VAE)[..., None], x, jax.lax.stop_gradient(x))
    return layers.constrain(x, _ACT)

  # -- decoder ---------------------------------------------------------------------------------------------
  def routing(self, batch) -> Routing:
    return Routing.from_batch(batch, dense=self.config.routing == "dense")

  def hidden_states(self, batch, latent_emb, routing: Optional[Routing] = None):
    """Joint forward of the packed row -> final hidden states [B, L, D] and aux metrics (`routing`: the
    batch's, when the caller also needs its inverse indices)."""
    meta = mask_lib.TokenMeta.from_row(batch["document"], batch["split"], batch["split_mode"])
    routing = self.routing(batch) if routing is None else routing
    x = self.embed_row(batch, latent_emb)
    h, aux = self.llm(x, routing, batch["position"], meta)
    aux = dict(aux, routing_dropped=routing.dropped_tokens().astype(jnp.float32))
    return h, aux

  def velocity(self, h_latent):
    return self.llm2vae(h_latent)

  # -- VAE -------------------------------------------------------------------------------------------------
  def encode_pixels(self, batch, rng):
    """Pixel-mode batches: encode `vae_pixels` with the frozen VAE (posterior sample, as the official train
    loop does on zero-padded images) and gather each latent token by `latent_src`."""
    px = batch["vae_pixels"]
    b, n_img, hh, ww, ch = px.shape
    z = self.vae.encode(px.reshape(b * n_img, hh, ww, ch), rng)
    tok = patchify_latents(z, self.config.latent_patch_size)  # [B*NIV, g*g, C]
    tok = tok.reshape(b, n_img * tok.shape[1], tok.shape[2])
    return jax.lax.stop_gradient(take_rows(tok, batch["latent_src"]))

  def decode_latents(self, z):
    return self.vae.decode(z)

  # -- training forward ------------------------------------------------------------------------------------
  def __call__(self, batch, rng, timestep_shift: float = 1.0):
    """Returns loss sums and counts (not yet normalised: normalisation needs global counts)."""
    c = self.config
    rng_vae, rng_noise = jax.random.split(rng)
    if "latent_x0" in batch:
      x0 = batch["latent_x0"].astype(jnp.float32)
    else:
      x0 = self.encode_pixels(batch, rng_vae).astype(jnp.float32)
    eps = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    x_t, t, target = noise_latents(x0, batch["latent_t_logit"], eps, timestep_shift)
    latent_emb = self.embed_latents(x_t.astype(layers.dtype_of(c.dtype)), t, batch["latent_pos"])
    routing = self.routing(batch)
    h, aux = self.hidden_states(batch, latent_emb, routing)

    # CE over the CE buffer.
    ce_valid = batch["ce_index"] >= 0
    h_ce = gather_rows(h, batch["ce_index"], inverse_index(batch["ce_index"], h.shape[1]))
    ce_tgt = take_rows(batch["ce_target"], batch["ce_index"])
    ce_w = jnp.where(ce_valid, take_rows(batch["ce_weight"], batch["ce_index"]), 0.0)
    ce_sum, ce_count = self.llm.ce_loss(h_ce, ce_tgt, ce_w)

    # Rectified-flow MSE over noisy latent tokens.
    h_lat = gather_rows(h, routing.gen_index, routing.gen_inv)  # gen_index is batch["latent_dest"]
    v_pred = self.velocity(h_lat).astype(jnp.float32)
    mse_tok = jnp.mean(jnp.square(v_pred - target), axis=-1)
    mse_w = jnp.where(batch["latent_image"] > 0, take_rows(batch["mse_weight"], batch["latent_dest"]), 0.0)
    out = dict(ce_sum=ce_sum, ce_count=ce_count, mse_sum=jnp.sum(mse_tok * mse_w), mse_count=jnp.sum(mse_w))
    out.update(aux)
    return out

  def init_all(self, batch, rng, with_vae: bool = True):
    """Touches every submodule so `init` creates the whole parameter tree (the VAE only if asked: running its
    convs just to create parameters is slow to compile, see `init_params`)."""
    out = self(batch, rng)
    if with_vae:
      f = self.config.vae.downsample
      self.vae(jnp.zeros((1, 2 * f, 2 * f, self.config.vae.in_channels), jnp.float32))
    return out


# ----------------------------------------------------------------------------------------------------------
# Functional API.
# ----------------------------------------------------------------------------------------------------------

def init_batch(config: BagelConfig) -> Dict[str, jnp.ndarray]:
  """A minimal all-padding batch: parameter shapes never depend on the batch shapes."""
  spec = batch_lib.BatchSpec.for_model(config, batch_size=1, seq_len=8, vit_capacity=1, latent_capacity=1,
                                      image_capacity=1)
  return {k: jnp.asarray(v) for k, v in spec.empty().items()}


def _boxed_init(config: BagelConfig, rng, with_vae: bool = True):
  return Bagel(config).init(rng, init_batch(config), jax.random.key(0), with_vae, method=Bagel.init_all)


def init_params(config: BagelConfig, rng) -> Params:
  """Plain (unboxed) parameter tree. The frozen VAE is initialised from its shapes (`init_vae_params`) rather
  than through a traced forward pass."""
  rng_model, rng_vae = jax.random.split(rng)
  params = jax.jit(lambda r: nn.unbox(_boxed_init(config, r, with_vae=False))["params"])(rng_model)
  params["vae"] = init_vae_params(config.vae, rng_vae)
  return params


def abstract_params(config: BagelConfig) -> Params:
  """Shapes/dtypes of the parameter tree without allocating it."""
  return nn.unbox(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))["params"]


def param_logical_axes(config: BagelConfig) -> Params:
  """Tree of `PartitionSpec`s of logical axis names, matching `init_params`."""
  boxed = jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0)))
  return nn.get_partition_spec(boxed)["params"]


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _is_spec(x):
  return isinstance(x, jax.sharding.PartitionSpec)


def init_gen_from_und(params: Params, config: BagelConfig) -> Params:
  """Official `copy_init_moe`: every gen-expert weight becomes a copy of its und counterpart."""
  axes = {k: v for k, v in param_logical_axes(config).items() if k in params}

  def copy(p, spec):
    if "modality" not in tuple(spec):
      return p
    ax = tuple(spec).index("modality")
    und = jax.lax.index_in_dim(p, 0, ax, keepdims=True)
    return jnp.concatenate([und, und], axis=ax)

  return jax.tree.map(copy, params, axes, is_leaf=_is_spec)


def expand_to_variant(dense_params: Params, config: BagelConfig) -> Params:
  """Dense parameters -> the `config` variant (moe/mot) with both experts initialised from the dense weights
  (how BAGEL starts from a Qwen2.5 checkpoint). `dense_params` may hold only some top-level modules."""
  axes = {k: v for k, v in param_logical_axes(config).items() if k in dense_params}

  def expand(spec, p):
    if "modality" not in tuple(spec):
      return p
    return jnp.stack([p, p], axis=tuple(spec).index("modality"))

  return jax.tree.map(expand, axes, dense_params, is_leaf=_is_spec)


def normalize_losses(sums: Dict[str, jnp.ndarray], ce_weight: float, mse_weight: float,
                     router_aux_weight: float = 0.0) -> Dict[str, jnp.ndarray]:
  """Global per-token means (the official reduction) and the weighted total."""
  ce = jnp.where(sums["ce_count"] > 0, sums["ce_sum"] / jnp.maximum(sums["ce_count"], 1e-9), 0.0)
  mse = jnp.where(sums["mse_count"] > 0, sums["mse_sum"] / jnp.maximum(sums["mse_count"], 1e-9), 0.0)
  loss = ce_weight * ce + mse_weight * mse
  if "router_aux_loss" in sums:
    loss = loss + router_aux_weight * sums["router_aux_loss"]
  return dict(loss=loss, ce=ce, mse=mse)


def loss_fn(params: Params, batch, rng, config: BagelConfig, *, timestep_shift: float = 1.0,
            ce_weight: float = 0.25, mse_weight: float = 1.0, counts=None):
  """Scalar training loss and metrics (CE:MSE defaults to the paper's 0.25:1).

  `counts` = (CE weight total, noisy-token total) of the whole global batch; give them when `batch` is one
  micro-batch of several so the accumulated gradient equals the full-batch gradient (official reduction)."""
  sums = Bagel(config).apply({"params": params}, batch, rng, timestep_shift)
  if "router_aux_loss" in sums:
    sums = dict(sums, router_aux_loss=sums["router_aux_loss"] / config.llm.num_layers)
  if counts is not None:
    sums = dict(sums, ce_count=counts[0], mse_count=counts[1])
  out = normalize_losses(sums, ce_weight, mse_weight, config.llm.router_aux_loss_weight)
  metrics = dict(sums, **out)
  return out["loss"], metrics
