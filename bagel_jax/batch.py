"""The packed batch: the one contract between data pipeline, model and attention kernel.

A `PackedBatch` is a plain dict of fixed-shape arrays (a pytree), so a step compiles once per `BatchSpec`.
The data pipeline fills it, `validate()` checks it on the host, the model and the kernel read it. The field
table below is the written contract (mirrored in docs/packed_batch.md); every producer and consumer uses it.

Conventions
- Index arrays (`und_index`, `ce_index`, `vit_dest`, `latent_dest`) hold positions in the row, ascending, and
  -1 in unused slots. Image ids (`vit_image`, `latent_image`) are 1..NI and 0 in unused slots.
- ViT tokens and latent tokens are stored in row order: the k-th valid ViT token fills the k-th position whose
  `modality` is VIT (so `vit_dest` is strictly increasing); likewise for latents.
- Gen-expert tokens are exactly the VAE latent tokens (clean and noisy); everything else that is not padding
  (text, specials incl. <|vision_start|>/<|vision_end|>, ViT tokens) is und-expert. `und_index` lists the
  und-expert positions; its capacity NU bounds how many und tokens a row may hold and sets the MoT routing
  cost: the per-token matmuls cost (NU + NL) / L of one dense pass over the row.
- VAE inputs come either as clean latents `latent_x0` [B, NL, C] (precomputed, already scaled/shifted) or as
  padded pixels `vae_pixels` [B, NIV, H, W, 3] in [-1, 1] plus `latent_src` (flat index of each latent token
  into the [NIV, H/f, W/f] latent-token grids), encoded by the frozen VAE inside the step.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional

import numpy as np

from bagel_jax.kernels.mask import CAUSAL, NOISE

# modality codes
TEXT, VIT, VAE, PAD = 0, 1, 2, 3
# expert codes
UND, GEN = 0, 1

PackedBatch = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static sizes of a packed batch. Unused capacity is padding, never a different shape."""
  batch_size: int          # B rows (per host when used by the pipeline, global when used by the step)
  seq_len: int             # L tokens per row (the packing budget)
  vit_capacity: int        # NV ViT tokens per row
  latent_capacity: int     # NL VAE latent tokens per row (= gen-expert capacity)
  image_capacity: int      # NI images per row (ViT and VAE images share one numbering)
  vit_patch_dim: int       # P = patch*patch*3
  latent_dim: int          # C = p*p*z (64 for FLUX)
  und_capacity: Optional[int] = None  # NU; None: seq_len
  ce_capacity: Optional[int] = None   # NC CE positions per row; None: seq_len
  # Pixel-input mode (VAE runs in the step); 0 disables it and the batch carries `latent_x0`.
  vae_image_capacity: int = 0         # NIV VAE images per row
  vae_image_size: int = 0             # H = W of the padded pixel buffers
  latent_downsample: int = 16         # pixels per latent token side (VAE factor x latent patch)

  def __post_init__(self):
    for name in ("batch_size", "seq_len", "vit_capacity", "latent_capacity", "image_capacity", "vit_patch_dim",
                 "latent_dim"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if "capacity" in name else 1):
        raise ValueError(f"BatchSpec.{name} must be an int >= {0 if 'capacity' in name else 1}, got {v!r}")
    for name in ("und_capacity", "ce_capacity"):
      v = getattr(self, name)
      if v is not None and not 1 <= v <= self.seq_len:
        raise ValueError(f"BatchSpec.{name}={v} must be in [1, seq_len={self.seq_len}]")
    if self.vae_image_capacity:
      if self.vae_image_size <= 0 or self.vae_image_size % self.latent_downsample:
        raise ValueError(f"BatchSpec.vae_image_size={self.vae_image_size} must be a positive multiple of "
                         f"latent_downsample={self.latent_downsample}")

  @classmethod
  def for_model(cls, model, *, batch_size: int, seq_len: int, vit_capacity: int, latent_capacity: int,
                image_capacity: int, und_capacity: Optional[int] = None, ce_capacity: Optional[int] = None,
                vae_image_capacity: int = 0, vae_image_size: int = 0) -> "BatchSpec":
    """The spec of a model (a `BagelConfig`): capacities as given, the per-token widths from the model (ViT
    patch, latent token, pixels per latent token). The one way a spec is built from a model config."""
    return cls(batch_size=batch_size, seq_len=seq_len, vit_capacity=vit_capacity, latent_capacity=latent_capacity,
               image_capacity=image_capacity, vit_patch_dim=model.vit.patch_dim, latent_dim=model.latent_channels,
               und_capacity=und_capacity, ce_capacity=ce_capacity, vae_image_capacity=vae_image_capacity,
               vae_image_size=vae_image_size, latent_downsample=model.latent_downsample)

  @property
  def nu(self) -> int:
    return self.und_capacity or self.seq_len

  @property
  def nc(self) -> int:
    return self.ce_capacity or self.seq_len

  @property
  def pixel_mode(self) -> bool:
    return self.vae_image_capacity > 0

  @property
  def latent_grid(self) -> int:
    return self.vae_image_size // self.latent_downsample

  def shapes(self) -> Dict[str, tuple]:
    """name -> (shape, numpy dtype) of every field."""
    b, l = self.batch_size, self.seq_len
    i32, f32 = np.int32, np.float32
    out = {
        # per token
        "text_ids": ((b, l), i32), "modality": ((b, l), i32), "expert": ((b, l), i32),
        "document": ((b, l), i32), "split": ((b, l), i32), "split_mode": ((b, l), i32),
        "position": ((b, l), i32), "ce_target": ((b, l), i32), "ce_weight": ((b, l), f32),
        "mse_weight": ((b, l), f32),
        # routing / loss buffers
        "und_index": ((b, self.nu), i32), "ce_index": ((b, self.nc), i32),
        # ViT tokens
        "vit_patches": ((b, self.vit_capacity, self.vit_patch_dim), f32),
        "vit_pos": ((b, self.vit_capacity), i32), "vit_image": ((b, self.vit_capacity), i32),
        "vit_dest": ((b, self.vit_capacity), i32),
        # VAE latent tokens
        "latent_pos": ((b, self.latent_capacity), i32), "latent_image": ((b, self.latent_capacity), i32),
        "latent_dest": ((b, self.latent_capacity), i32),
        "latent_t_logit": ((b, self.latent_capacity), f32),
        # per image: token grid (h, w); (0, 0) for unused slots
        "image_grid": ((b, self.image_capacity, 2), i32),
        # per row counters
        "num_tokens": ((b,), i32), "num_ce": ((b,), i32), "num_mse": ((b,), i32),
        "num_documents": ((b,), i32),
    }
    if self.pixel_mode:
      out["vae_pixels"] = ((b, self.vae_image_capacity, self.vae_image_size, self.vae_image_size, 3), f32)
      out["latent_src"] = ((b, self.latent_capacity), i32)
    else:
      out["latent_x0"] = ((b, self.latent_capacity, self.latent_dim), f32)
    return out

  def empty(self) -> PackedBatch:
    """An all-padding batch (valid by `validate`)."""
    batch = {k: np.zeros(s, d) for k, (s, d) in self.shapes().items()}
    batch["modality"][:] = PAD
    for k in ("und_index", "ce_index", "vit_dest", "latent_dest"):
      batch[k][:] = -1
    if "latent_src" in batch:
      batch["latent_src"][:] = -1
    batch["latent_t_logit"][:] = -np.inf
    return batch

  def abstract(self, sharding=None):
    """`jax.ShapeDtypeStruct`s of every field, for AOT lowering."""
    import jax  # pylint: disable=import-outside-toplevel
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in self.shapes().items()}


def spec_of(batch: Mapping[str, np.ndarray], **kw) -> BatchSpec:
  """Recovers the `BatchSpec` from a batch's shapes."""
  b, l = batch["modality"].shape
  pixel = "vae_pixels" in batch
  return BatchSpec(
      batch_size=b, seq_len=l, vit_capacity=batch["vit_patches"].shape[1],
      latent_capacity=batch["latent_pos"].shape[1], image_capacity=batch["image_grid"].shape[1],
      vit_patch_dim=batch["vit_patches"].shape[2],
      latent_dim=kw.pop("latent_dim", None) or (batch["latent_x0"].shape[2] if not pixel else 1),
      und_capacity=batch["und_index"].shape[1], ce_capacity=batch["ce_index"].shape[1],
      vae_image_capacity=batch["vae_pixels"].shape[1] if pixel else 0,
      vae_image_size=batch["vae_pixels"].shape[2] if pixel else 0, **kw)


# ----------------------------------------------------------------------------------------------------------
# validate(): host-side consistency checks. Every error names the field and the row.
# ----------------------------------------------------------------------------------------------------------

def _fail(field: str, row, msg: str):
  where = f" (row {row})" if row is not None else ""
  raise ValueError(f"PackedBatch.{field}{where}: {msg}")


def _check_index_buffer(batch, field: str, row: int, expected_positions: np.ndarray):
  idx = batch[field][row]
  n = int((idx >= 0).sum())
  if n and not np.all(idx[:n] >= 0):
    _fail(field, row, "valid entries must come first, then -1 padding")
  if np.any(idx[n:] != -1):
    _fail(field, row, "unused slots must be -1")
  if len(expected_positions) > len(idx):
    _fail(field, row, f"{len(expected_positions)} positions exceed its capacity {len(idx)}")
  if not np.array_equal(idx[:n], expected_positions):
    _fail(field, row, f"does not list the expected positions (got {n} entries, expected "
          f"{len(expected_positions)}; first mismatch among {idx[:n][:8]} vs {expected_positions[:8]})")


def validate(batch: Mapping[str, np.ndarray], spec: Optional[BatchSpec] = None) -> None:
  """Raises ValueError naming the field and row if the batch breaks the contract."""
  spec = spec or spec_of(batch)
  shapes = spec.shapes()
  missing = sorted(set(shapes) - set(batch))
  if missing:
    _fail(missing[0], None, f"missing field (also missing: {missing[1:]})" if missing[1:] else "missing field")
  unknown = sorted(set(batch) - set(shapes))
  if unknown:
    _fail(unknown[0], None, "unknown field for this BatchSpec")
  for name, (shape, dtype) in shapes.items():
    arr = np.asarray(batch[name])
    if arr.shape != shape:
      _fail(name, None, f"shape {arr.shape} != expected {shape}")
    if np.dtype(arr.dtype).kind != np.dtype(dtype).kind:
      _fail(name, None, f"dtype {arr.dtype} is not of kind {np.dtype(dtype)}")

  b, l = spec.batch_size, spec.seq_len
  positions = np.arange(l)
  for r in range(b):
    mod, doc, split = batch["modality"][r], batch["document"][r], batch["split"][r]
    mode, expert = batch["split_mode"][r], batch["expert"][r]
    if np.any((mod < TEXT) | (mod > PAD)):
      _fail("modality", r, "values must be in {0 text, 1 vit, 2 vae, 3 pad}")
    pad = mod == PAD
    if np.any(doc[pad] != 0) or np.any(split[pad] != 0):
      _fail("document", r, "padding tokens must have document 0 and split 0")
    if np.any(doc[~pad] <= 0) or np.any(split[~pad] <= 0):
      _fail("document", r, "non-padding tokens need document >= 1 and split >= 1")
    if np.any((mode < CAUSAL) | (mode > NOISE)):
      _fail("split_mode", r, "values must be in {0 causal, 1 full, 2 noise}")
    want_expert = np.where(mod == VAE, GEN, UND)
    if np.any(expert[~pad] != want_expert[~pad]):
      _fail("expert", r, "VAE latent tokens must use the gen expert (1) and all other tokens the und expert (0)")
    n_tok = int((~pad).sum())
    if int(batch["num_tokens"][r]) != n_tok:
      _fail("num_tokens", r, f"{int(batch['num_tokens'][r])} != number of non-padding tokens {n_tok}")
    real = positions[~pad]
    if len(real):
      # documents and splits: contiguous runs, increasing along the row
      d, s = doc[real], split[real]
      if np.any(np.diff(d) < 0) or np.any(np.diff(s) < 0):
        _fail("split", r, "documents and splits must be non-decreasing along the row")
      s_start = np.r_[True, np.diff(s) != 0]
      d_change = np.r_[True, np.diff(d) != 0]
      if np.any(d_change & ~s_start):
        _fail("split", r, "a split spans two documents")
      run_id = np.cumsum(s_start)
      if len(np.unique(s)) != run_id[-1]:
        _fail("split", r, "splits are not contiguous (a split id reappears after another split)")
      for sid in np.unique(s):
        m = mode[real][s == sid]
        if np.any(m != m[0]):
          _fail("split_mode", r, f"split {sid} mixes attention modes")
      if int(batch["num_documents"][r]) != len(np.unique(d)):
        _fail("num_documents", r, f"{int(batch['num_documents'][r])} != {len(np.unique(d))} documents in row")
    elif int(batch["num_documents"][r]) != 0:
      _fail("num_documents", r, "must be 0 for an empty row")

    # CE labels
    ce_w = batch["ce_weight"][r]
    if np.any(ce_w < 0):
      _fail("ce_weight", r, "negative weight")
    ce_pos = positions[ce_w > 0]
    if np.any(pad[ce_pos]):
      _fail("ce_weight", r, f"CE target on padding at positions {ce_pos[pad[ce_pos]][:5]}")
    if np.any(mod[ce_pos] != TEXT):
      _fail("ce_weight", r, "CE positions must be text tokens")
    if np.any(batch["ce_target"][r][ce_w <= 0] != 0):
      _fail("ce_target", r, "must be 0 where ce_weight is 0")
    if int(batch["num_ce"][r]) != len(ce_pos):
      _fail("num_ce", r, f"{int(batch['num_ce'][r])} != {len(ce_pos)} CE positions")
    _check_index_buffer(batch, "ce_index", r, ce_pos)
    _check_index_buffer(batch, "und_index", r, positions[(~pad) & (mod != VAE)])

    # ViT tokens
    vit_img = batch["vit_image"][r]
    nv = int((vit_img > 0).sum())
    if np.any(vit_img[nv:] != 0) or np.any(vit_img[:nv] <= 0):
      _fail("vit_image", r, "valid ViT tokens must come first, then 0 padding")
    _check_index_buffer(batch, "vit_dest", r, positions[mod == VIT])
    # VAE latent tokens
    lat_img = batch["latent_image"][r]
    nl = int((lat_img > 0).sum())
    if np.any(lat_img[nl:] != 0) or np.any(lat_img[:nl] <= 0):
      _fail("latent_image", r, "valid latent tokens must come first, then 0 padding")
    _check_index_buffer(batch, "latent_dest", r, positions[mod == VAE])
    mse_w = batch["mse_weight"][r]
    if np.any(mse_w < 0):
      _fail("mse_weight", r, "negative weight")
    if np.any((mse_w > 0) & (mod != VAE)):
      _fail("mse_weight", r, "MSE weight on a token that is not a VAE latent")
    t_logit = batch["latent_t_logit"][r][:nl]
    lat_dest = batch["latent_dest"][r][:nl]
    noisy = np.isfinite(t_logit)
    if np.any(np.isnan(t_logit)) or np.any(np.isposinf(t_logit)):
      _fail("latent_t_logit", r, "must be finite (noisy) or -inf (clean)")
    if np.any(mse_w[lat_dest][~noisy] > 0):
      _fail("mse_weight", r, "MSE weight on a clean latent (t_logit = -inf)")
    if np.any(mode[lat_dest] == CAUSAL):
      _fail("split_mode", r, "latent tokens must sit in a full or noise split")
    if int(batch["num_mse"][r]) != int((mse_w > 0).sum()):
      _fail("num_mse", r, f"{int(batch['num_mse'][r])} != {int((mse_w > 0).sum())} MSE positions")

    # images: token counts must match their grids
    grid = batch["image_grid"][r]
    for img in np.unique(np.r_[vit_img[:nv], lat_img[:nl]]):
      if not 1 <= img <= spec.image_capacity:
        _fail("image_grid", r, f"image id {img} outside 1..{spec.image_capacity}")
      h, w = (int(x) for x in grid[img - 1])
      n_img = int((vit_img == img).sum() + (lat_img == img).sum())
      if h * w != n_img:
        _fail("image_grid", r, f"image {img} has {n_img} tokens but its grid is {h}x{w}={h * w}")
      if (vit_img == img).any() and (lat_img == img).any():
        _fail("image_grid", r, f"image id {img} used by both ViT and latent tokens")
    if "latent_src" in batch:
      src = batch["latent_src"][r]
      g = spec.latent_grid
      if np.any(src[:nl] < 0) or np.any(src[:nl] >= spec.vae_image_capacity * g * g):
        _fail("latent_src", r, f"indices must lie in [0, {spec.vae_image_capacity * g * g})")
      if np.any(src[nl:] != -1):
        _fail("latent_src", r, "unused slots must be -1")
