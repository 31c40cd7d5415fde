"""Model FLOPs per step and MFU, shared by the training logger and the AOT report.

Counting convention (MaxText's): matmul FLOPs only, 2 per multiply-add, training = 3 x forward for trained
modules (forward + two backward matmuls), 1 x forward for frozen ones (the VAE encoder in pixel mode).

Per step, from the batch metadata (no model call):
- LLM: each non-padding token runs ONE expert's layer (MoT/MoE hard routing), so 2 * P_layer per token per
  layer, P_layer = D*(Hq + 2*Hkv)*Dh + Hq*Dh*D + 3*D*F (top-k MoE: k experts of width F_e plus the router).
- Attention: 4 * Hq * Dh per allowed (q, k) pair per layer (QK^T and PV), pairs counted exactly from the
  generalized causal mask (not L^2, not a causal half).
- LM head: 2 * D * V per CE position (the CE buffer), velocity head / vae2llm / timestep MLP per latent token.
- ViT: 2 * P_vit_layer per ViT token per layer plus 4 * H * Dh per pair of tokens of the same image; connector
  per ViT token.
- VAE encoder (pixel mode): conv FLOPs of the encoder for every padded image slot, forward only.
"""
from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

from bagel_jax.batch import PAD
from bagel_jax.kernels.mask import NOISE
from bagel_jax.models import variants
from bagel_jax.models.config import BagelConfig
from bagel_jax.parallel.topology import peak_flops

def allowed_pairs_per_row(document: np.ndarray, split: np.ndarray, mode: np.ndarray) -> np.ndarray:
  """Exact number of allowed (q, k) pairs of the generalized causal mask per row, in O(L).

  For query q: keys k <= q of its document that are not in another split's noise, plus (full/noise queries) the
  keys after q inside its own split."""
  out = np.zeros(document.shape[0], np.int64)
  for r in range(document.shape[0]):
    doc, spl, md = document[r], split[r], mode[r]
    valid = doc > 0
    n = len(doc)
    idx = np.arange(n)
    # start/end of each token's split and document
    new_split = np.r_[True, spl[1:] != spl[:-1]]
    new_doc = np.r_[True, doc[1:] != doc[:-1]]
    split_start = np.maximum.accumulate(np.where(new_split, idx, 0))
    doc_start = np.maximum.accumulate(np.where(new_doc, idx, 0))
    split_end = np.minimum.accumulate(np.where(np.r_[new_split[1:], True], idx, n)[::-1])[::-1]
    visible = (md != NOISE).astype(np.int64)
    prefix = np.cumsum(visible)
    before_doc = np.where(doc_start > 0, prefix[np.maximum(doc_start - 1, 0)], 0)
    count = prefix - before_doc  # visible keys <= q in the document
    own_noise = md == NOISE
    count = count + np.where(own_noise, idx - split_start + 1, 0)  # own noise split up to q
    bidir = md != 0
    count = count + np.where(bidir, split_end - idx, 0)
    out[r] = int(np.sum(np.where(valid, count, 0)))
  return out


def llm_layer_params(cfg: BagelConfig) -> float:
  lc = cfg.llm
  attn = lc.hidden_size * (lc.num_heads + 2 * lc.num_kv_heads) * lc.head_dim + lc.num_heads * lc.head_dim * lc.hidden_size
  mlp = variants.get(lc.layer_variant).mlp_params(lc)  # the variant's active FFN per token
  return float(attn + mlp)


def vit_layer_params(cfg: BagelConfig) -> float:
  v = cfg.vit
  return float(4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size)


def vae_encoder_flops(cfg: BagelConfig, height: int, width: int) -> float:
  """Forward conv/attention FLOPs of the FLUX encoder for one [height, width] image."""
  c = cfg.vae
  flops = 0.0
  h, w = height, width
  conv = lambda k, cin, cout, hh, ww: 2.0 * k * k * cin * cout * hh * ww
  flops += conv(3, c.in_channels, c.ch, h, w)
  cin = c.ch
  for i, m in enumerate(c.ch_mult):
    cout = c.ch * m
    for _ in range(c.num_res_blocks):
      flops += conv(3, cin, cout, h, w) + conv(3, cout, cout, h, w) + (conv(1, cin, cout, h, w) if cin != cout else 0)
      cin = cout
    if i != len(c.ch_mult) - 1:
      h, w = h // 2, w // 2
      flops += conv(3, cin, cin, h, w)
  flops += 2 * (2 * conv(3, cin, cin, h, w))  # mid resnet blocks
  flops += 4 * conv(1, cin, cin, h, w) + 2 * 2.0 * (h * w) ** 2 * cin  # mid attention
  flops += conv(3, cin, 2 * c.z_channels, h, w)
  return flops


def step_flops(batch: Mapping[str, np.ndarray], cfg: BagelConfig) -> Dict[str, float]:
  """Model FLOPs of one training step on `batch` (host numpy), by component."""
  lc, v = cfg.llm, cfg.vit
  mod = np.asarray(batch["modality"])
  n_tok = float(np.sum(mod != PAD))
  n_vit = float(np.sum(np.asarray(batch["vit_image"]) > 0))
  n_lat = float(np.sum(np.asarray(batch["latent_image"]) > 0))
  n_ce = float(np.sum(np.asarray(batch["ce_weight"]) > 0))
  pairs = float(allowed_pairs_per_row(np.asarray(batch["document"]), np.asarray(batch["split"]),
                                      np.asarray(batch["split_mode"])).sum())
  d = lc.hidden_size
  out = {
      "llm_matmul": 3 * 2 * llm_layer_params(cfg) * lc.num_layers * n_tok,
      "llm_attention": 3 * 4 * lc.num_heads * lc.head_dim * pairs * lc.num_layers,
      "lm_head": 3 * 2 * d * lc.vocab_size * n_ce,
      "latent_io": 3 * 2 * (2 * cfg.latent_channels * d + 256 * d + d * d) * n_lat,
  }
  vit_pairs = 0.0
  vit_img = np.asarray(batch["vit_image"])
  for r in range(vit_img.shape[0]):
    _, counts = np.unique(vit_img[r][vit_img[r] > 0], return_counts=True)
    vit_pairs += float(np.sum(counts.astype(np.float64) ** 2))
  out["vit"] = 3 * (2 * vit_layer_params(cfg) * n_vit + 4 * v.hidden_size * vit_pairs) * v.num_layers
  out["connector"] = 3 * 2 * (v.hidden_size * d + d * d) * n_vit
  if "vae_pixels" in batch:
    px = np.asarray(batch["vae_pixels"])
    out["vae_encoder"] = vae_encoder_flops(cfg, px.shape[2], px.shape[3]) * px.shape[0] * px.shape[1]
  out["total"] = float(sum(out.values()))
  out["tokens"] = n_tok
  out["attention_pairs"] = pairs
  return out


def mfu(flops: float, seconds: float, n_devices: int, device_kind: str) -> float:
  peak = peak_flops(device_kind)
  if not peak or seconds <= 0:
    return float("nan")
  return flops / seconds / (peak * n_devices)
