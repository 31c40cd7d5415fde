"""SigLIP NaViT vision encoder (BAGEL's understanding ViT, reference §2).

Images of different sizes are packed into one row of patches; `image_ids` turns into per-image bidirectional
segments for the attention dispatch, so packing is exact (no cross-image leakage) and the padded row keeps a
static shape under `jit`. Parameter names mirror HF `SiglipVisionModel` so `convert/siglip.py` is a rename
plus transposes.
"""
from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels.attention import attention
from bagel_jax.models import layers
from bagel_jax.models.config import ViTConfig

EMBED = "vit_embed"
MLP = "vit_mlp"
HEADS = "vit_heads"
HEAD_DIM = "head_dim"
ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
  """[H, W, C] -> [(H/p)*(W/p), p*p*C] in raster token order, each patch flattened (row, col, channel) as
  BAGEL's `patchify` (einsum chpwq->hwpqc) and the converted patch-embedding kernel expect."""
  h, w, c = image.shape
  if h % patch or w % patch:
    raise ValueError(f"patchify: image {h}x{w} is not a multiple of patch {patch}")
  x = np.asarray(image).reshape(h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 2, 1, 3, 4).reshape((h // patch) * (w // patch), patch * patch * c)


def patch_position_ids(grid_h: int, grid_w: int, max_patches_per_side: int) -> np.ndarray:
  """Row-major ids into the S*S learned table: the top-left grid_h x grid_w sub-grid, not an interpolation
  (BAGEL's `get_flattened_position_ids_extrapolate`)."""
  if grid_h > max_patches_per_side or grid_w > max_patches_per_side:
    raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds max_patches_per_side={max_patches_per_side}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return (rows * max_patches_per_side + cols).reshape(-1).astype(np.int32)


class PositionEmbedding(nn.Module):
  """Learned absolute table [S*S, hidden], gathered by position id."""
  num_positions: int
  features: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, pos_ids):
    table = layers.param(self, "embedding", layers.normal_init, (self.num_positions, self.features),
                         ("vit_pos", EMBED), layers.dtype_of(self.param_dtype))
    # clip: padding slots may carry any id, and an out-of-range gather would otherwise fill NaN.
    return jnp.take(table, pos_ids, axis=0, mode="clip").astype(layers.dtype_of(self.dtype))


class Embeddings(nn.Module):
  config: ViTConfig
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, patches, pos_ids):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Linear((c.patch_dim,), (c.hidden_size,), ("vit_patch",), (EMBED,), name="patch_embedding",
                      **kw)(patches)
    x = x + PositionEmbedding(c.max_patches_per_side ** 2, c.hidden_size, name="position_embedding",
                              **kw)(pos_ids)
    return layers.constrain(x, ACT_AXES)


class SelfAttention(nn.Module):
  config: ViTConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "reference"

  @nn.compact
  def __call__(self, x, meta: mask_lib.TokenMeta):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = (c.num_heads, c.head_dim)
    qkv_axes = ("activation_batch", "activation_length", "activation_heads", HEAD_DIM)
    q, k, v = (layers.constrain(layers.Linear((c.hidden_size,), heads, (EMBED,), (HEADS, HEAD_DIM),
                                              name=f"{n}_proj", **kw)(x), qkv_axes) for n in "qkv")
    o = attention(q, k, v, meta, meta, impl=self.attention_impl, scale=c.head_dim ** -0.5)
    return layers.Linear(heads, (c.hidden_size,), (HEADS, HEAD_DIM), (EMBED,), name="out_proj", **kw)(o)


class MLPBlock(nn.Module):
  config: ViTConfig
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Linear((c.hidden_size,), (c.intermediate_size,), (EMBED,), (MLP,), name="fc1", **kw)(x)
    h = layers.constrain(layers.gelu_tanh(h), ("activation_batch", "activation_length", "activation_mlp"))
    return layers.Linear((c.intermediate_size,), (c.hidden_size,), (MLP,), (EMBED,), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
  """Pre-LN block. Returns (x, None) so the same class is the body of `nn.scan`."""
  config: ViTConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "reference"

  @nn.compact
  def __call__(self, x, meta: mask_lib.TokenMeta) -> Tuple[jnp.ndarray, None]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(c.hidden_size, EMBED, c.layer_norm_eps, name="layer_norm1", **kw)(x)
    h = SelfAttention(c, attention_impl=self.attention_impl, name="self_attn", **kw)(h, meta)
    x = layers.constrain(x + checkpoint_name(h, "attn_out"), ACT_AXES)
    h = layers.LayerNorm(c.hidden_size, EMBED, c.layer_norm_eps, name="layer_norm2", **kw)(x)
    h = MLPBlock(c, name="mlp", **kw)(h)
    x = layers.constrain(x + checkpoint_name(h, "mlp_out"), ACT_AXES)
    return x, None


class Encoder(nn.Module):
  config: ViTConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "reference"
  remat_policy: str = "none"
  scan_layers: bool = True

  @nn.compact
  def __call__(self, x, meta: mask_lib.TokenMeta):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
    block = layers.maybe_remat(EncoderLayer, self.remat_policy)
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,),
                      length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(c, name="layers", **kw)(x, meta)
    else:
      for j in range(c.num_layers):
        x, _ = block(c, name=f"layers_{j}", **kw)(x, meta)
    return x


class SiglipViT(nn.Module):
  """patches [B, NV, p*p*C] in [-1, 1], pos_ids [B, NV] (row*S + col), image_ids [B, NV] (1.. per image,
  0 = padding) -> post-LayerNorm hidden states [B, NV, hidden].

  `config.num_layers` layers run and post_layernorm is applied after the last of them, as BAGEL does with 26
  of SigLIP's 27 layers. Outputs at padding slots are finite but meaningless.
  """
  config: ViTConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "reference"
  remat_policy: str = "none"
  scan_layers: bool = True

  @nn.compact
  def __call__(self, patches, pos_ids, image_ids):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if patches.shape[-1] != c.patch_dim:
      raise ValueError(f"SiglipViT: patches have {patches.shape[-1]} features, expected patch_dim={c.patch_dim}")
    meta = mask_lib.TokenMeta.segments(image_ids)
    x = Embeddings(c, name="embeddings", **kw)(patches, pos_ids)
    x = Encoder(c, attention_impl=self.attention_impl, remat_policy=self.remat_policy,
                scan_layers=self.scan_layers, name="encoder", **kw)(x, meta)
    x = layers.LayerNorm(c.hidden_size, EMBED, c.layer_norm_eps, name="post_layernorm", **kw)(x)
    return layers.constrain(x, ACT_AXES)
