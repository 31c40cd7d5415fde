"""Representative packed rows of a stage's data mix: what the model-FLOPs count and the attention kernels' tile
fraction are computed on (the AOT compile itself only sees shapes)."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Optional

import numpy as np

from bagel_jax.batch import BatchSpec
from bagel_jax.data.sequence import (LayoutConfig, Text, VaeImage, VideoGroup, VitImage, assemble_batch, fits,
                                     layout_sample)
from bagel_jax.kernels import block_tables as bt
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.train.config import batch_spec


def stage_ratios(config) -> Dict[str, float]:
  """The stage's data-kind ratios (`config.stage_mix.ratios`, written by the recipe from Table 3), positive only."""
  mix = config.get("stage_mix", None)
  ratios = {k: float(v) for k, v in dict(mix.ratios).items() if v > 0} if mix is not None else {}
  if not ratios:
    raise ValueError("config.stage_mix.ratios: no data kind has a positive ratio (each recipe sets its stage's "
                     "Table 3 ratios, experiments/bagel_7b/)")
  return ratios


def representative_row(config, model_cfg, ratios: Optional[Mapping[str, float]] = None, gen_px: int = 512,
                       und_px: int = 448):
  """One row of `config.batch` capacities filled greedily with samples of each data kind in proportion to the
  stage ratios (caption 64 tokens, generation images of `gen_px`, understanding images of `und_px`, 4-frame
  video groups at half resolution, web documents with two images)."""
  spec = batch_spec(config, model_cfg, batch_size=1)
  if spec.pixel_mode:  # rows laid out with latents: the same tokens (the frozen VAE encoder is not counted)
    spec = dataclasses.replace(spec, vae_image_capacity=0, vae_image_size=0)
  layout = LayoutConfig.from_model_config(model_cfg)
  ratios = dict(ratios) if ratios is not None else stage_ratios(config)
  # image sides as asked, but small enough that two images fit a row's capacities (tiny test configs)
  lat_side = max(1, min(gen_px // model_cfg.latent_downsample, model_cfg.max_latent_size,
                        math.isqrt(max(1, spec.latent_capacity // 2))))
  vit_side = max(1, min(und_px // model_cfg.vit.patch_size, model_cfg.vit.max_patches_per_side,
                        math.isqrt(max(1, spec.vit_capacity // 2))))
  long_text = max(8, min(1024, spec.seq_len // 4))
  c, p = model_cfg.latent_channels, model_cfg.vit.patch_dim
  vae = lambda side, noisy: VaeImage((side, side), latents=np.zeros((side * side, c), np.float32), noisy=noisy)
  vit = lambda side: VitImage(np.zeros((side * side, p), np.float32), (side, side))
  text = lambda n, loss: Text([5] * n, loss=loss)
  kinds = {
      "text": lambda: [text(long_text, True)],
      "t2i": lambda: [text(64, False), vae(lat_side, True)],
      "i2t": lambda: [vit(vit_side), text(32, False), text(64, True)],
      "interleaved_und": lambda: [vit(vit_side), text(64, False), vit(vit_side), text(128, True)],
      "video": lambda: [text(30, False), vae(lat_side // 2, False),
                        VideoGroup([vae(lat_side // 2, False) for _ in range(3)], [1, 1, 1])],
      "web": lambda: [text(128, False), vae(lat_side, False), vit(vit_side), text(256, True), vae(lat_side, True)],
  }
  order = sorted(ratios, key=lambda k: -ratios[k])
  used = {k: 0.0 for k in order}
  row = []
  blocked = set()
  for _ in range(10_000):
    open_kinds = [k for k in order if k not in blocked]
    if not open_kinds:
      break
    kind = min(open_kinds, key=lambda k: used[k] / ratios[k])  # keep the token shares close to the ratios
    s = layout_sample(kinds[kind](), layout)
    if not fits(row + [s], spec):
      blocked.add(kind)  # a smaller kind may still fit
      continue
    row.append(s)
    used[kind] += len(s)
  return assemble_batch([row], spec, layout)


def tile_fractions(row, block: int = 512) -> Dict[int, float]:
  """Non-empty tile fraction of the LLM row and of the ViT row of a packed batch (keyed by their lengths, for
  `ops.assume_tile_fraction`)."""

  def frac(meta):
    length = meta.document.shape[1]
    blk = min(block, -(-length // 128) * 128)
    pad = -length % blk
    meta = mask_lib.TokenMeta(*(np.pad(np.asarray(a, np.int32), ((0, 0), (0, pad))) for a in meta))
    classes = bt.tile_classes(meta, meta, blk, blk, xp=np)
    return float((classes != bt.EMPTY).mean())

  out = {}
  vit_ids = np.asarray(row["vit_image"])
  if vit_ids.shape[1]:
    out[vit_ids.shape[1]] = frac(mask_lib.TokenMeta.segments(vit_ids))
  meta = mask_lib.TokenMeta.from_row(row["document"], row["split"], row["split_mode"])
  out[int(row["document"].shape[1])] = frac(meta)  # the LLM row wins if the lengths coincide
  return out


def denoise_batch(model_cfg, rows: int, prompt: int = 64, px: int = 1024):
  """Rows of one prompt + one noisy `px` latent image each (what a sampler's step recomputes without a cache)."""
  side = min(px // model_cfg.latent_downsample, model_cfg.max_latent_size)
  layout = LayoutConfig.from_model_config(model_cfg)
  sample = layout_sample([Text([5] * prompt), VaeImage((side, side), latents=np.zeros(
      (side * side, model_cfg.latent_channels), np.float32), noisy=True)], layout)
  length = -(-len(sample) // 128) * 128
  spec = BatchSpec(batch_size=1, seq_len=length, vit_capacity=0, latent_capacity=side * side, image_capacity=1,
                   vit_patch_dim=model_cfg.vit.patch_dim, latent_dim=model_cfg.latent_channels,
                   latent_downsample=model_cfg.latent_downsample)
  one = assemble_batch([[sample]], spec, layout)
  return dataclasses.replace(spec, batch_size=rows), one
