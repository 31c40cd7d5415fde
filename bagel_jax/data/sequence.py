"""Interleaved samples -> packed rows, by the official `PackedDataset.pack_sequence` rules (reference §1.4,
§1.5, §3.4, §4.1).

A sample is a list of items. `layout_sample` turns one sample into per-token arrays; `assemble_batch` places
several laid-out samples per row into the fixed-shape `PackedBatch` of a `BatchSpec`. Everything is numpy on
the host; the Grain pipeline calls these.

Rules implemented here:
- text: `<|im_start|> ids <|im_end|>`, one causal split, consecutive RoPE ids; with `loss`, the first n+1
  tokens carry CE labels `ids + [<|im_end|>]`.
- image (ViT or VAE): `<|vision_start|> tokens <|vision_end|>`, one split (`full`; `noise` for a noisy VAE
  image), the whole block at one RoPE id; the id advances by 1 except after a noisy image.
- video group: several VAE frames in one `full` split (diffusion forcing), one timestep for the group, RoPE id
  advancing by each frame's `frame_delta`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax.batch import PAD, TEXT, VAE, VIT, BatchSpec
from bagel_jax.kernels.mask import CAUSAL, FULL, NOISE


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  bos: int   # <|im_start|>
  eos: int   # <|im_end|>
  vision_start: int
  vision_end: int

  @classmethod
  def from_llm_config(cls, llm) -> "SpecialTokens":
    return cls(llm.bos_token_id, llm.eos_token_id, llm.vision_start_token_id, llm.vision_end_token_id)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """What laying out a row needs from the model: special-token ids and the sides of the ViT and latent
  position grids (position id = row * side + col)."""
  special: SpecialTokens
  vit_side: int
  latent_side: int

  @classmethod
  def from_model_config(cls, config) -> "LayoutConfig":
    return cls(SpecialTokens.from_llm_config(config.llm), config.vit.max_patches_per_side,
               config.max_latent_size)


@dataclasses.dataclass
class Text:
  ids: Sequence[int]
  loss: bool = False


@dataclasses.dataclass
class VitImage:
  patches: np.ndarray          # [h*w, patch_dim], raster order, (p, q, c) inside a patch
  grid: tuple                  # (h, w) in patches


@dataclasses.dataclass
class VaeImage:
  """A VAE image: clean context (`noisy=False`) or a generation target with MSE loss (`noisy=True`).

  Give `latents` ([h*w, C] clean latent tokens, scaled/shifted) for latent-mode batches or `pixels`
  ([h*f, w*f, 3] in [-1, 1]) for pixel-mode batches, where the step runs the VAE."""
  grid: tuple                  # (h, w) in latent tokens
  latents: Optional[np.ndarray] = None
  pixels: Optional[np.ndarray] = None
  noisy: bool = False
  t_logit: float = 0.0         # raw timestep logit n ~ N(0,1) of a noisy image


@dataclasses.dataclass
class VideoGroup:
  """Consecutive VAE frames forming one `full` split; all frames share `t_logit` when `noisy`."""
  frames: Sequence[VaeImage]
  frame_deltas: Sequence[int]
  noisy: bool = True
  t_logit: float = 0.0


Item = Union[Text, VitImage, VaeImage, VideoGroup]


@dataclasses.dataclass
class SampleLayout:
  """One sample laid out as tokens (all arrays of the sample's length n unless noted)."""
  text_ids: np.ndarray
  modality: np.ndarray
  split: np.ndarray            # local split ids 1..
  split_mode: np.ndarray
  position: np.ndarray
  ce_target: np.ndarray
  ce_weight: np.ndarray
  mse_weight: np.ndarray
  images: List[dict]           # per image: kind 'vit'|'vae', grid, tokens/pixels, t_logit, first token offset

  def __len__(self) -> int:
    return len(self.modality)

  @property
  def num_vit_tokens(self) -> int:
    return sum(im["grid"][0] * im["grid"][1] for im in self.images if im["kind"] == "vit")

  @property
  def num_latent_tokens(self) -> int:
    return sum(im["grid"][0] * im["grid"][1] for im in self.images if im["kind"] == "vae")

  @property
  def num_und_tokens(self) -> int:
    return len(self) - self.num_latent_tokens

  @property
  def num_ce(self) -> int:
    return int((self.ce_weight > 0).sum())

  @property
  def num_vae_images(self) -> int:
    return sum(im["kind"] == "vae" for im in self.images)


def layout_sample(items: Sequence[Item], layout: LayoutConfig) -> SampleLayout:
  """Lays out one interleaved sample by the official rules."""
  special = layout.special
  cols = {k: [] for k in ("text_ids", "modality", "split", "split_mode", "position", "ce_target", "ce_weight",
                          "mse_weight")}
  images: List[dict] = []
  rope = 0
  split = 0

  def emit(text_id, modality, mode, pos, ce_target=0, ce_weight=0.0, mse=0.0):
    cols["text_ids"].append(text_id)
    cols["modality"].append(modality)
    cols["split"].append(split)
    cols["split_mode"].append(mode)
    cols["position"].append(pos)
    cols["ce_target"].append(ce_target)
    cols["ce_weight"].append(ce_weight)
    cols["mse_weight"].append(mse)

  def emit_image_block(kind, grid, mode, pos, payload, t_logit, mse):
    h, w = (int(x) for x in grid)
    side = layout.vit_side if kind == "vit" else layout.latent_side
    if h > side or w > side or h <= 0 or w <= 0:
      raise ValueError(f"{kind} image grid {h}x{w} outside 1..{side} tokens per side")
    emit(special.vision_start, TEXT, mode, pos)
    images.append(dict(kind=kind, grid=(h, w), offset=len(cols["modality"]), t_logit=t_logit, **payload))
    modality = VIT if kind == "vit" else VAE
    for _ in range(h * w):
      emit(0, modality, mode, pos, mse=mse)
    emit(special.vision_end, TEXT, mode, pos)

  def vae_payload(im: VaeImage):
    if (im.latents is None) == (im.pixels is None):
      raise ValueError("VaeImage needs exactly one of `latents` or `pixels`")
    if im.latents is not None:
      lat = np.asarray(im.latents, np.float32)
      if lat.shape[0] != im.grid[0] * im.grid[1]:
        raise ValueError(f"VaeImage: {lat.shape[0]} latent tokens do not match grid {im.grid}")
      return dict(latents=lat)
    return dict(pixels=np.asarray(im.pixels, np.float32))

  for item in items:
    split += 1
    if isinstance(item, Text):
      ids = [int(i) for i in item.ids]
      tokens = [special.bos] + ids + [special.eos]
      labels = ids + [special.eos]
      for j, tok in enumerate(tokens):
        has_label = item.loss and j < len(labels)
        emit(tok, TEXT, CAUSAL, rope + j, ce_target=labels[j] if has_label else 0,
             ce_weight=1.0 if has_label else 0.0)
      rope += len(tokens)
    elif isinstance(item, VitImage):
      patches = np.asarray(item.patches, np.float32)
      if patches.shape[0] != item.grid[0] * item.grid[1]:
        raise ValueError(f"VitImage: {patches.shape[0]} patches do not match grid {item.grid}")
      emit_image_block("vit", item.grid, FULL, rope, dict(patches=patches), -np.inf, 0.0)
      rope += 1
    elif isinstance(item, VaeImage):
      mode = NOISE if item.noisy else FULL
      t_logit = float(item.t_logit) if item.noisy else -np.inf
      emit_image_block("vae", item.grid, mode, rope, vae_payload(item), t_logit, 1.0 if item.noisy else 0.0)
      if not item.noisy:
        rope += 1
    elif isinstance(item, VideoGroup):
      if len(item.frame_deltas) != len(item.frames):
        raise ValueError("VideoGroup: one frame_delta per frame")
      t_logit = float(item.t_logit) if item.noisy else -np.inf
      for frame, delta in zip(item.frames, item.frame_deltas):
        emit_image_block("vae", frame.grid, FULL, rope, vae_payload(frame), t_logit, 1.0 if item.noisy else 0.0)
        rope += int(delta)
    else:
      raise TypeError(f"unknown sample item {type(item).__name__}")

  dt = dict(ce_weight=np.float32, mse_weight=np.float32)
  arrays = {k: np.asarray(v, dt.get(k, np.int32)) for k, v in cols.items()}
  return SampleLayout(images=images, **arrays)


def fits(layouts: Sequence[SampleLayout], spec: BatchSpec) -> bool:
  """Whether these samples fit together in one row of `spec` (every capacity, not just tokens)."""
  n_img = sum(len(s.images) for s in layouts)
  return (sum(len(s) for s in layouts) <= spec.seq_len
          and sum(s.num_vit_tokens for s in layouts) <= spec.vit_capacity
          and sum(s.num_latent_tokens for s in layouts) <= spec.latent_capacity
          and sum(s.num_und_tokens for s in layouts) <= spec.nu
          and sum(s.num_ce for s in layouts) <= spec.nc
          and n_img <= spec.image_capacity
          and (not spec.pixel_mode or sum(s.num_vae_images for s in layouts) <= spec.vae_image_capacity))


def assemble_batch(rows: Sequence[Sequence[SampleLayout]], spec: BatchSpec,
                   layout: LayoutConfig) -> batch_lib.PackedBatch:
  """Places each row's samples back to back, assigns documents/splits/images, pads every capacity."""
  if len(rows) != spec.batch_size:
    raise ValueError(f"assemble_batch: {len(rows)} rows for batch_size {spec.batch_size}")
  out = spec.empty()
  for r, samples in enumerate(rows):
    if not fits(samples, spec):
      raise ValueError(f"assemble_batch: samples of row {r} exceed the BatchSpec capacities")
    _fill_row(out, r, samples, spec, layout)
  return out


def _fill_row(out: Dict[str, np.ndarray], r: int, samples: Sequence[SampleLayout], spec: BatchSpec,
              layout: LayoutConfig):
  cursor = 0
  split_base = 0
  image_id = 0
  n_vit = n_lat = n_vae_img = 0
  g = spec.latent_grid
  for doc, s in enumerate(samples, start=1):
    n = len(s)
    sl = slice(cursor, cursor + n)
    out["text_ids"][r, sl] = s.text_ids
    out["modality"][r, sl] = s.modality
    out["expert"][r, sl] = np.where(s.modality == VAE, batch_lib.GEN, batch_lib.UND)
    out["document"][r, sl] = doc
    out["split"][r, sl] = s.split + split_base
    out["split_mode"][r, sl] = s.split_mode
    out["position"][r, sl] = s.position
    out["ce_target"][r, sl] = s.ce_target
    out["ce_weight"][r, sl] = s.ce_weight
    out["mse_weight"][r, sl] = s.mse_weight
    for im in s.images:
      image_id += 1
      h, w = im["grid"]
      out["image_grid"][r, image_id - 1] = (h, w)
      dest = cursor + im["offset"] + np.arange(h * w)
      rows_, cols_ = np.divmod(np.arange(h * w), w)
      if im["kind"] == "vit":
        k = slice(n_vit, n_vit + h * w)
        out["vit_patches"][r, k] = im["patches"]
        out["vit_pos"][r, k] = rows_ * layout.vit_side + cols_
        out["vit_image"][r, k] = image_id
        out["vit_dest"][r, k] = dest
        n_vit += h * w
      else:
        k = slice(n_lat, n_lat + h * w)
        out["latent_image"][r, k] = image_id
        out["latent_dest"][r, k] = dest
        out["latent_t_logit"][r, k] = im["t_logit"]
        out["latent_pos"][r, k] = rows_ * layout.latent_side + cols_
        if "latents" in im:
          if "latent_x0" not in out:
            raise ValueError("assemble_batch: latent tokens given but the BatchSpec is in pixel mode")
          out["latent_x0"][r, k] = im["latents"]
        else:
          if "vae_pixels" not in out:
            raise ValueError("assemble_batch: pixels given but the BatchSpec is in latent mode")
          px = im["pixels"]
          out["vae_pixels"][r, n_vae_img, :px.shape[0], :px.shape[1]] = px
          out["latent_src"][r, k] = n_vae_img * g * g + rows_ * g + cols_
          n_vae_img += 1
        n_lat += h * w
    cursor += n
    split_base += int(s.split.max()) if n else 0
  valid = np.arange(spec.seq_len) < cursor
  out["modality"][r, ~valid] = PAD
  positions = np.arange(spec.seq_len)
  und = positions[valid & (out["modality"][r] != VAE)]
  out["und_index"][r, :len(und)] = und
  ce = positions[out["ce_weight"][r] > 0]
  out["ce_index"][r, :len(ce)] = ce
  out["num_tokens"][r] = cursor
  out["num_ce"][r] = len(ce)
  out["num_mse"][r] = int((out["mse_weight"][r] > 0).sum())
  out["num_documents"][r] = len(samples)
