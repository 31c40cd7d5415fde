"""Hand-written and random packed batches for tests, benchmarks and smoke runs (no data needed).

`config` below is a model config (`models.config.BagelConfig`); only its shapes are read (vocabulary, ViT patch,
latent token width and stride, position-table sides), so this module does not import the model layer.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from bagel_jax.batch import BatchSpec, PackedBatch
from bagel_jax.data.sequence import (Item, SampleLayout, Text, VaeImage, VideoGroup, VitImage, assemble_batch, fits,
                                     layout_sample)
from bagel_jax.layout import LayoutConfig


def batch_spec_for(config, *, batch_size: int = 2, seq_len: int = 128, vit_capacity: int = 32,
                   latent_capacity: int = 48, image_capacity: int = 8, und_capacity: Optional[int] = None,
                   ce_capacity: Optional[int] = None, pixel_images: int = 0, pixel_size: int = 0) -> BatchSpec:
  """`BatchSpec.for_model` with the small capacities of the tests' hand-written and random batches."""
  return BatchSpec.for_model(config, batch_size=batch_size, seq_len=seq_len, vit_capacity=vit_capacity,
                             latent_capacity=latent_capacity, image_capacity=image_capacity,
                             und_capacity=und_capacity, ce_capacity=ce_capacity, vae_image_capacity=pixel_images,
                             vae_image_size=pixel_size)


class _Gen:
  """Random item factory for one model config."""

  def __init__(self, config, rng: np.random.Generator, pixel_mode: bool = False):
    self.c, self.rng, self.pixel_mode = config, rng, pixel_mode
    self.first_id = 5  # ids 0..4 are padding/specials in the tiny vocabulary

  def text(self, n: int, loss: bool) -> Text:
    return Text(self.rng.integers(self.first_id, self.c.llm.vocab_size, n).tolist(), loss=loss)

  def vit(self, h: int, w: int) -> VitImage:
    return VitImage(self.rng.uniform(-1, 1, (h * w, self.c.vit.patch_dim)).astype(np.float32), (h, w))

  def vae(self, h: int, w: int, noisy: bool) -> VaeImage:
    t = float(self.rng.normal()) if noisy else 0.0
    if self.pixel_mode:
      f = self.c.latent_downsample
      px = self.rng.uniform(-1, 1, (h * f, w * f, 3)).astype(np.float32)
      return VaeImage((h, w), pixels=px, noisy=noisy, t_logit=t)
    lat = self.rng.normal(size=(h * w, self.c.latent_channels)).astype(np.float32)
    return VaeImage((h, w), latents=lat, noisy=noisy, t_logit=t)


def hand_written_samples(config, seed: int = 0, pixel_mode: bool = False) -> List[List[Item]]:
  """The three documents of the mask test: (1) text -> noisy image -> its clean copy -> text with loss;
  (2) ViT image -> text with loss (VQA); (3) text only with loss."""
  g = _Gen(config, np.random.default_rng(seed), pixel_mode)
  noisy = g.vae(2, 3, noisy=True)
  clean = VaeImage(noisy.grid, latents=noisy.latents, pixels=noisy.pixels, noisy=False)
  return [
      [g.text(4, loss=False), noisy, clean, g.text(3, loss=True)],
      [g.vit(2, 2), g.text(5, loss=True)],
      [g.text(6, loss=True)],
  ]


def random_sample(g: _Gen, kind: str) -> List[Item]:
  """One random sample of a BAGEL data kind (small sizes)."""
  r = g.rng
  side = lambda hi: int(r.integers(1, hi + 1))
  lat_hi = max(1, min(4, g.c.max_latent_size))
  vit_hi = max(1, min(4, g.c.vit.max_patches_per_side))
  if kind == "text":
    return [g.text(int(r.integers(3, 12)), loss=True)]
  if kind == "t2i":
    return [g.text(int(r.integers(2, 8)), loss=False), g.vae(side(lat_hi), side(lat_hi), noisy=True)]
  if kind == "vqa":
    return [g.vit(side(vit_hi), side(vit_hi)), g.text(int(r.integers(2, 6)), loss=False),
            g.text(int(r.integers(1, 4)), loss=True)]
  if kind == "edit":
    h, w = side(lat_hi), side(lat_hi)
    src = g.vae(h, w, noisy=False)
    return [src, g.vit(min(h, vit_hi), min(w, vit_hi)), g.text(int(r.integers(2, 6)), loss=False),
            g.vae(h, w, noisy=True)]
  if kind == "video":
    h, w = side(lat_hi), side(lat_hi)
    frames = [g.vae(h, w, noisy=False) for _ in range(int(r.integers(2, 4)))]
    return [g.text(3, loss=False), g.vae(h, w, noisy=False),
            VideoGroup(frames, [1] * len(frames), noisy=True, t_logit=float(r.normal()))]
  raise ValueError(f"unknown sample kind {kind!r}")


KINDS = ("text", "t2i", "vqa", "edit", "video")


def random_batch(config, spec: BatchSpec, seed: int = 0,
                 kinds: Sequence[str] = KINDS, max_tries: int = 200) -> PackedBatch:
  """Greedily fills every row with random samples of `kinds` until the next one does not fit."""
  layout = LayoutConfig.from_model_config(config)
  g = _Gen(config, np.random.default_rng(seed), pixel_mode=spec.pixel_mode)
  rows: List[List[SampleLayout]] = []
  for _ in range(spec.batch_size):
    row: List[SampleLayout] = []
    for _ in range(max_tries):
      s = layout_sample(random_sample(g, kinds[int(g.rng.integers(len(kinds)))]), layout)
      if fits(row + [s], spec):
        row.append(s)
      elif row:
        break
    rows.append(row)
  return assemble_batch(rows, spec, layout)


def hand_written_batch(config, spec: BatchSpec, seed: int = 0) -> PackedBatch:
  """Row 0 holds the three hand-written documents; other rows are empty (padding)."""
  layout = LayoutConfig.from_model_config(config)
  docs = [layout_sample(s, layout) for s in hand_written_samples(config, seed, spec.pixel_mode)]
  rows = [docs] + [[] for _ in range(spec.batch_size - 1)]
  return assemble_batch(rows, spec, layout)
