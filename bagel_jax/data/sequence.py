"""Interleaved samples -> packed rows, by the official `PackedDataset.pack_sequence` rules (reference §1.4,
§1.5, §3.4, §4.1).

A sample is a list of items. `layout_sample` turns one sample into per-token arrays; `assemble_batch` places
several laid-out samples per row into the fixed-shape `PackedBatch` of a `BatchSpec`. Everything is numpy on
the host; the Grain pipeline calls these. How one item becomes tokens is `bagel_jax.layout` (shared with the
inference contexts); what this module adds is the sample level:
- text: one causal split; with `loss`, the first n+1 tokens carry CE labels `ids + [<|im_end|>]`.
- image (ViT or VAE): one split (`full`; `noise` for a noisy VAE image).
- video group: several VAE frames in one `full` split (diffusion forcing), one timestep for the group, RoPE id
  advancing by each frame's `frame_delta`.
- CFG dropout (§5.5): items with `cfg=True` may be dropped by `apply_cfg_dropout`; a dropped item becomes
  `Dropped(advance)`, which emits no tokens but still moves the RoPE counter: by 1 for a ViT/VAE image, by 0
  for text (the official `pack_sequence` does `curr_rope_id += 1; continue` only for images).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from bagel_jax import batch as batch_lib
from bagel_jax import layout as layout_lib
from bagel_jax.batch import PAD, TEXT, VAE, VIT, BatchSpec
from bagel_jax.kernels.mask import CAUSAL, FULL, NOISE
from bagel_jax.layout import LayoutConfig


@dataclasses.dataclass
class Text:
  ids: Sequence[int]
  loss: bool = False
  cfg: bool = False            # droppable condition (official `enable_cfg`)


@dataclasses.dataclass
class VitImage:
  patches: np.ndarray          # [h*w, patch_dim], raster order, (p, q, c) inside a patch
  grid: tuple                  # (h, w) in patches
  cfg: bool = False


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
  cfg: bool = False            # droppable clean condition (never set on a noisy target)


@dataclasses.dataclass
class VideoGroup:
  """Consecutive VAE frames forming one `full` split; all frames share `t_logit` when `noisy`."""
  frames: Sequence[VaeImage]
  frame_deltas: Sequence[int]
  noisy: bool = True
  t_logit: float = 0.0


@dataclasses.dataclass
class Dropped:
  """A CFG-dropped item: no tokens, the RoPE counter advances by `advance` (1 for images, 0 for text)."""
  advance: int = 0


Item = Union[Text, VitImage, VaeImage, VideoGroup, Dropped]


def apply_cfg_dropout(items: Sequence[Item], rng: np.random.Generator, text: float = 0.1, vit: float = 0.5,
                      vae: float = 0.1) -> List[Item]:
  """Drops each `cfg=True` item independently with its kind's probability (paper §2.3: text 0.1, ViT 0.5,
  clean VAE 0.1). One uniform draw per droppable item, in order, from the sample's own RNG."""
  out: List[Item] = []
  for item in items:
    p = None
    if isinstance(item, Text) and item.cfg:
      p, advance = text, 0
    elif isinstance(item, VitImage) and item.cfg:
      p, advance = vit, 1
    elif isinstance(item, VaeImage) and item.cfg:
      if item.noisy:
        raise ValueError("apply_cfg_dropout: a noisy VAE target cannot be a droppable condition (cfg=True)")
      p, advance = vae, 1
    if p is not None and rng.random() < p:
      out.append(Dropped(advance))
    else:
      out.append(item)
  return out


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
  """Lays out one interleaved sample by the official rules (built block by block: one numpy fill per item)."""
  special = layout.special
  blocks = {k: [] for k in ("text_ids", "modality", "split", "split_mode", "position", "ce_target", "ce_weight",
                            "mse_weight")}
  images: List[dict] = []
  state = dict(rope=0, split=0, n=0)

  def emit_block(text_ids, modality, mode, position, ce_target=None, ce_weight=None, mse=0.0):
    n = len(text_ids)
    blocks["text_ids"].append(np.asarray(text_ids, np.int32))
    blocks["modality"].append(np.asarray(modality, np.int32))
    blocks["split"].append(np.full(n, state["split"], np.int32))
    blocks["split_mode"].append(np.full(n, mode, np.int32))
    blocks["position"].append(np.asarray(position, np.int32) if np.ndim(position) else np.full(n, position, np.int32))
    blocks["ce_target"].append(np.zeros(n, np.int32) if ce_target is None else np.asarray(ce_target, np.int32))
    blocks["ce_weight"].append(np.zeros(n, np.float32) if ce_weight is None else np.asarray(ce_weight, np.float32))
    blocks["mse_weight"].append(np.full(n, mse, np.float32))
    state["n"] += n

  def emit_image_block(kind, grid, mode, pos, payload, t_logit, mse):
    h, w = (int(x) for x in grid)
    layout_lib.grid_positions((h, w), layout.vit_side if kind == "vit" else layout.latent_side, f"{kind} image")
    n = h * w
    ids, modality = layout_lib.image_tokens(n, VIT if kind == "vit" else VAE, special)
    mse_w = np.full(n + 2, mse, np.float32)
    mse_w[0] = mse_w[-1] = 0.0
    images.append(dict(kind=kind, grid=(h, w), offset=state["n"] + 1, t_logit=t_logit, **payload))
    emit_block(ids, modality, mode, pos)
    blocks["mse_weight"][-1] = mse_w

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
    if isinstance(item, Dropped):
      state["rope"] += int(item.advance)
      continue
    state["split"] += 1
    rope = state["rope"]
    if isinstance(item, Text):
      tokens = layout_lib.text_tokens(item.ids, special)
      n = len(tokens)
      ce_t = np.zeros(n, np.int32)
      ce_w = np.zeros(n, np.float32)
      if item.loss:
        ce_t[:n - 1] = tokens[1:]  # ids + [<|im_end|>]
        ce_w[:n - 1] = 1.0
      emit_block(tokens, np.full(n, TEXT, np.int32), CAUSAL, rope + np.arange(n), ce_t, ce_w)
      state["rope"] += n
    elif isinstance(item, VitImage):
      patches = np.asarray(item.patches, np.float32)
      if patches.shape[0] != item.grid[0] * item.grid[1]:
        raise ValueError(f"VitImage: {patches.shape[0]} patches do not match grid {item.grid}")
      emit_image_block("vit", item.grid, FULL, rope, dict(patches=patches), -np.inf, 0.0)
      state["rope"] += layout_lib.IMAGE_ROPE_ADVANCE
    elif isinstance(item, VaeImage):
      mode = NOISE if item.noisy else FULL
      t_logit = float(item.t_logit) if item.noisy else -np.inf
      emit_image_block("vae", item.grid, mode, rope, vae_payload(item), t_logit, 1.0 if item.noisy else 0.0)
      state["rope"] += layout_lib.NOISY_ROPE_ADVANCE if item.noisy else layout_lib.IMAGE_ROPE_ADVANCE
    elif isinstance(item, VideoGroup):
      if len(item.frame_deltas) != len(item.frames):
        raise ValueError("VideoGroup: one frame_delta per frame")
      t_logit = float(item.t_logit) if item.noisy else -np.inf
      for frame, delta in zip(item.frames, item.frame_deltas):
        emit_image_block("vae", frame.grid, FULL, state["rope"], vae_payload(frame), t_logit,
                         1.0 if item.noisy else 0.0)
        state["rope"] += int(delta)
    else:
      raise TypeError(f"unknown sample item {type(item).__name__}")

  dt = dict(ce_weight=np.float32, mse_weight=np.float32)
  arrays = {k: (np.concatenate(v) if v else np.zeros(0, dt.get(k, np.int32))).astype(dt.get(k, np.int32), copy=False)
            for k, v in blocks.items()}
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
        out["vit_pos"][r, k] = layout_lib.grid_positions((h, w), layout.vit_side)
        out["vit_image"][r, k] = image_id
        out["vit_dest"][r, k] = dest
        n_vit += h * w
      else:
        k = slice(n_lat, n_lat + h * w)
        out["latent_image"][r, k] = image_id
        out["latent_dest"][r, k] = dest
        out["latent_t_logit"][r, k] = im["t_logit"]
        out["latent_pos"][r, k] = layout_lib.grid_positions((h, w), layout.latent_side)
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
