"""Representative packed rows of a stage's data mix, packed by the real packer (`data.pipeline.PackBatches`):
what the model-FLOPs count, the attention kernels' tile fraction and the kernel benchmark are computed on
(the AOT compile itself only sees shapes).

Samples are drawn i.i.d. by kind with the stage's ratios as probabilities (what `data.sources.mix` does with
source weights), with random sizes, so document boundaries fall anywhere in a row:
  text             one document of 256..4,096 tokens with loss;
  t2i              a caption (16..96 tokens) + a noisy generation image (edges uniform in the stage's gen_size);
  i2t              an understanding image (edges uniform in und_size) + question (8..64) + answer (8..256, loss);
  interleaved_und  two or three understanding images with text between them, the last text with loss;
  video            a caption + 2..4 clean frames at half the gen edge + one noisy frame group;
  web              text, a clean generation image, an understanding image, text with loss, a noisy image.
Sizes are this module's model of the stage (stated here, not measured data statistics).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import grain
import numpy as np

from bagel_jax.batch import BatchSpec
from bagel_jax.data.packing import PackBatches, Prepared, sample_needs
from bagel_jax.data.sequence import LayoutConfig, Text, VaeImage, VideoGroup, VitImage, assemble_batch, layout_sample
from bagel_jax.kernels import block_tables as bt
from bagel_jax.kernels import mask as mask_lib
from bagel_jax.kernels import ops
from bagel_jax.train.config import batch_spec

KINDS = ("text", "t2i", "i2t", "interleaved_und", "video", "web")


@dataclasses.dataclass(frozen=True)
class StageMix:
  """A stage's data kinds (ratios) and image edges in pixels ((min, max); (0, 0) when the stage has none)."""
  ratios: Mapping[str, float]
  gen_px: Tuple[int, int] = (256, 512)
  und_px: Tuple[int, int] = (224, 980)

  @classmethod
  def from_config(cls, config) -> "StageMix":
    """`config.stage_mix.ratios` and the recipe's `config.data.gen_size` / `und_size` (Table 3)."""
    mix = config.get("stage_mix", None)
    ratios = {k: float(v) for k, v in dict(mix.ratios).items() if v > 0} if mix is not None else {}
    if not ratios:
      raise ValueError("config.stage_mix.ratios: no data kind has a positive ratio (each recipe sets its stage's "
                       "Table 3 ratios, experiments/bagel_7b/)")
    unknown = sorted(set(ratios) - set(KINDS))
    if unknown:
      raise ValueError(f"config.stage_mix.ratios: unknown kinds {unknown} (known: {list(KINDS)})")
    data = config.get("data", {})
    gen = tuple(int(x) for x in data.get("gen_size", cls.gen_px))
    und = tuple(int(x) for x in data.get("und_size", cls.und_px))
    return cls(ratios, gen, und)


class _Draw:
  """Random items at the 7B-style layout of one model config."""

  def __init__(self, model_cfg, mix: StageMix, spec: BatchSpec, rng: np.random.Generator):
    self.c, self.mix, self.rng = model_cfg, mix, rng
    self.max_text = max(16, spec.seq_len // 2)

  def n(self, lo: int, hi: int) -> int:
    return int(self.rng.integers(lo, hi + 1))

  def text(self, lo: int, hi: int, loss: bool) -> Text:
    return Text([5] * min(self.n(lo, hi), self.max_text), loss=loss)

  def _grid(self, px: Tuple[int, int], stride: int, side: int, scale: float = 1.0) -> Tuple[int, int]:
    edge = lambda: max(1, min(side, int(self.n(*px) * scale) // stride))
    return edge(), edge()

  def vae(self, noisy: bool, scale: float = 1.0) -> VaeImage:
    h, w = self._grid(self.mix.gen_px, self.c.latent_downsample, self.c.max_latent_size, scale)
    return VaeImage((h, w), latents=_zeros(h * w, self.c.latent_channels), noisy=noisy,
                    t_logit=float(self.rng.normal()) if noisy else 0.0)

  def vit(self) -> VitImage:
    h, w = self._grid(self.mix.und_px, self.c.vit.patch_size, self.c.vit.max_patches_per_side)
    return VitImage(_zeros(h * w, self.c.vit.patch_dim), (h, w))

  def sample(self, kind: str) -> List:
    if kind == "text":
      return [self.text(256, 4096, True)]
    if kind == "t2i":
      return [self.text(16, 96, False), self.vae(True)]
    if kind == "i2t":
      return [self.vit(), self.text(8, 64, False), self.text(8, 256, True)]
    if kind == "interleaved_und":
      items = []
      for _ in range(self.n(2, 3)):
        items += [self.vit(), self.text(16, 128, False)]
      return items + [self.text(16, 256, True)]
    if kind == "video":  # one frame size per clip: a clean first frame, then a noisy group of 1..3 frames
      first = self.vae(False, 0.5)
      frame = lambda: VaeImage(first.grid, latents=first.latents, noisy=False)
      n = self.n(1, 3)
      return [self.text(16, 64, False), first, VideoGroup([frame() for _ in range(n)], [1] * n)]
    if kind == "web":
      return [self.text(64, 512, False), self.vae(False), self.vit(), self.text(64, 512, True), self.vae(True)]
    raise ValueError(f"unknown data kind {kind!r}")


def _zeros(n: int, d: int) -> np.ndarray:
  """Placeholder pixels/latents: only their shapes matter here. A zero-stride view, so a pool of thousands of
  samples with 4,900-patch images costs no memory (real arrays took the benchmark past 18 GB)."""
  return np.broadcast_to(np.zeros((1, d), np.float32), (n, d))


def stage_samples(model_cfg, mix: StageMix, spec: BatchSpec, seed: int = 0) -> Iterator[Prepared]:
  """An endless stream of laid-out samples of the mix, as the pipeline hands them to the packer."""
  layout = LayoutConfig.from_model_config(model_cfg)
  rng = np.random.default_rng(seed)
  draw = _Draw(model_cfg, mix, spec, rng)
  kinds = sorted(mix.ratios)
  p = np.array([mix.ratios[k] for k in kinds], np.float64)
  p /= p.sum()
  while True:
    kind = kinds[int(rng.choice(len(kinds), p=p))]
    s = layout_sample(draw.sample(kind), layout)
    yield Prepared(s, kind, "stage_mix", sample_needs(s, spec.pixel_mode))


def packed_rows(model_cfg, mix: StageMix, spec: BatchSpec, rows: int, seed: int = 0, skip_batches: int = 1):
  """`rows` rows of `spec`'s capacities packed by the real packer (best fit over a buffer of 16 samples) from
  the mix's sample stream -> one batch dict [rows, L]. The first `skip_batches` batches are dropped: the packer
  starts empty, later batches begin with the samples it buffered (its steady state, what training sees).
  Samples that exceed a row's capacities on their own are skipped by the packer, as in training."""
  spec = dataclasses.replace(spec, batch_size=rows)
  if spec.pixel_mode:  # rows laid out with latents: the same tokens (the frozen VAE encoder is not counted)
    spec = dataclasses.replace(spec, vae_image_capacity=0, vae_image_size=0)
  stream = stage_samples(model_cfg, mix, spec, seed)
  pool = 512 + rows * (skip_batches + 1) * spec.seq_len // 64  # samples are >= 64 tokens but for rare ones
  it = iter(PackBatches.from_samples(grain.MapDataset.source([next(stream) for _ in range(pool)]), spec,
                                     LayoutConfig.from_model_config(model_cfg)))
  for _ in range(skip_batches):
    next(it)
  return next(it)[0]


def representative_rows(config, model_cfg, rows: int = 8, seed: int = 0,
                        mix: Optional[StageMix] = None):
  """Rows of `config.batch` capacities packed from the config's stage mix."""
  spec = batch_spec(config, model_cfg, batch_size=1)
  return packed_rows(model_cfg, mix or StageMix.from_config(config), spec, rows, seed)


def _tile_fraction(meta) -> np.ndarray:
  """Non-empty tile fraction per row of [B, L] metadata at the kernel's tiles for that length."""
  length = meta.document.shape[1]
  blk = min(ops.block_size(length), -(-length // 128) * 128)
  pad = -length % blk
  meta = mask_lib.TokenMeta(*(np.pad(np.asarray(a, np.int32), ((0, 0), (0, pad))) for a in meta))
  classes = bt.tile_classes(meta, meta, blk, blk, xp=np)
  return (classes != bt.EMPTY).reshape(classes.shape[0], -1).mean(axis=1)


def tile_fractions(batch) -> Dict[int, float]:
  """Mean non-empty tile fraction of the LLM rows and of the ViT rows of a packed batch (keyed by their
  lengths, for `ops.assume_tile_fraction`)."""
  out = {}
  vit_ids = np.asarray(batch["vit_image"])
  if vit_ids.shape[1]:
    out[vit_ids.shape[1]] = float(_tile_fraction(mask_lib.TokenMeta.segments(vit_ids)).mean())
  meta = mask_lib.TokenMeta.from_row(batch["document"], batch["split"], batch["split_mode"])
  out[int(batch["document"].shape[1])] = float(_tile_fraction(meta).mean())  # the LLM row wins a tie
  return out


def spread(values) -> Dict[str, float]:
  """min / p10 / median / p90 / max / mean of a sample."""
  v = np.asarray(values, np.float64)
  q = np.percentile(v, [0, 10, 50, 90, 100])
  return dict(min=float(q[0]), p10=float(q[1]), median=float(q[2]), p90=float(q[3]), max=float(q[4]),
              mean=float(v.mean()), n=int(v.size))


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
