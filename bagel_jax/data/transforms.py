"""Image decoding and the official resize rules (`data/transforms.py`, reference §2 and §5.6), in numpy/Pillow.

- `ResizeRule(max_size, min_size, stride, max_pixels)` is `MaxLongEdgeMinShortEdgeResize`: scale the long edge
  down to `max_size` (never up), then up so the short edge reaches `min_size`; round each side to a multiple of
  `stride` (at least `stride`); if the area exceeds `max_pixels / img_num` rescale, and if the long edge then
  exceeds `max_size` rescale again. The area rescale multiplies the sides by the *area* ratio, as the official
  code does (not its square root), so it overshoots on purpose; keep it so sizes match the reference.
- ViT side: stride = patch size, then `vit_patches` (row, col, channel order inside a patch, raster order over
  patches) as the converted SigLIP patch embedding expects. VAE side: stride = the model's latent downsample
  (VAE factor x latent patch: 16 for FLUX), so the latent grid is (H/stride, W/stride).
- Pixels are normalised with mean = std = 0.5 to [-1, 1]; bicubic resize (Pillow antialiases when shrinking).
- Undecodable input raises `SkipSample` with reason `decode_error` (corrupt or truncated files) so the pipeline
  skips and counts it instead of crashing.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Tuple, Union

import numpy as np
from PIL import Image


class SkipSample(Exception):
  """A sample the pipeline drops and counts under `reason` (e.g. decode_error, missing_file, empty_text)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class ResizeRule:
  max_size: int
  min_size: int
  stride: int
  max_pixels: int = 14 * 14 * 9 * 1024  # official ImageTransform default

  def __post_init__(self):
    for name in ("max_size", "min_size", "stride", "max_pixels"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"ResizeRule.{name} must be a positive int, got {v!r}")
    if self.max_size < self.stride:
      raise ValueError(f"ResizeRule.max_size={self.max_size} is below the stride {self.stride}")


def _divisible(value: float, stride: int) -> int:
  return max(stride, int(round(value / stride) * stride))


def _apply(width: float, height: float, scale: float, stride: int) -> Tuple[int, int]:
  return _divisible(round(width * scale), stride), _divisible(round(height * scale), stride)


def target_size(width: int, height: int, rule: ResizeRule, img_num: int = 1) -> Tuple[int, int]:
  """(new_width, new_height) by the official rule; see the module docstring."""
  if width <= 0 or height <= 0:
    raise ValueError(f"target_size: image size {width}x{height} must be positive")
  scale = min(rule.max_size / max(width, height), 1.0)
  scale = max(scale, rule.min_size / min(width, height))
  w, h = _apply(width, height, scale, rule.stride)
  if w * h > rule.max_pixels / img_num:
    w, h = _apply(w, h, rule.max_pixels / img_num / (w * h), rule.stride)
  if max(w, h) > rule.max_size:
    w, h = _apply(w, h, rule.max_size / max(w, h), rule.stride)
  return w, h


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB; transparency composited on white (the official `pil_img2rgb`)."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, img).convert("RGB")
  return img.convert("RGB")


ImageLike = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]


def decode(data: ImageLike, where: str = "") -> Image.Image:
  """Encoded bytes, a uint8 HxWx3 array or a PIL image -> RGB PIL image; SkipSample('decode_error') otherwise."""
  if isinstance(data, Image.Image):
    return to_rgb(data)
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] not in (3, 4) or min(data.shape[:2]) == 0:
      if data.dtype == np.object_ and data.ndim == 0:
        return decode(data.item(), where)
      raise SkipSample("bad_field", f"{where}: image array must be uint8 HxWx3, got {data.dtype} {data.shape}")
    return to_rgb(Image.fromarray(data))
  if isinstance(data, (bytes, bytearray, memoryview)):
    try:
      img = Image.open(io.BytesIO(bytes(data)))
      img.load()  # forces the full decode: truncated files fail here
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for bad files
      raise SkipSample("decode_error", f"{where}: {type(e).__name__}: {e}") from e
    return to_rgb(img)
  raise SkipSample("bad_field", f"{where}: expected image bytes or an array, got {type(data).__name__}")


def resize(img: Image.Image, rule: ResizeRule, img_num: int = 1) -> Image.Image:
  w, h = target_size(img.width, img.height, rule, img_num)
  if (w, h) == img.size:
    return img
  return img.resize((w, h), Image.BICUBIC)


def to_float(img: Image.Image) -> np.ndarray:
  """uint8 RGB -> float32 [H, W, 3] in [-1, 1] (mean = std = 0.5)."""
  return np.asarray(img, np.float32) * (2.0 / 255.0) - 1.0


def vit_patches(pixels: np.ndarray, patch: int) -> Tuple[np.ndarray, Tuple[int, int]]:
  """[H, W, C] -> ([(H/p)(W/p), p*p*C], (H/p, W/p)); identical to `bagel_jax.models.siglip.patchify`, which is
  not imported here to keep Flax out of data worker processes."""
  h, w, c = pixels.shape
  if h % patch or w % patch:
    raise ValueError(f"vit_patches: image {h}x{w} is not a multiple of patch {patch}")
  x = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
  return np.ascontiguousarray(x.reshape((h // patch) * (w // patch), patch * patch * c)), (h // patch, w // patch)


@dataclasses.dataclass(frozen=True)
class ImageTransforms:
  """Both sides of one model: `vit` (stride = patch) and `vae` (stride = latent downsample), with the grid
  limits of the model's position tables."""
  vit: ResizeRule
  vae: ResizeRule
  patch: int
  vit_max_side: int       # patches per side (SigLIP table)
  latent_downsample: int
  latent_max_side: int    # latent tokens per side (max_latent_size)

  def __post_init__(self):
    if self.vit.stride % self.patch:
      raise ValueError(f"ImageTransforms: ViT stride {self.vit.stride} is not a multiple of the patch {self.patch}")
    if self.vae.stride % self.latent_downsample:
      raise ValueError(f"ImageTransforms: VAE stride {self.vae.stride} is not a multiple of the latent "
                       f"downsample {self.latent_downsample}")
    if self.vit.max_size > self.patch * self.vit_max_side:
      raise ValueError(f"ImageTransforms: ViT max_size {self.vit.max_size} exceeds the position table "
                       f"({self.vit_max_side} patches x {self.patch} px)")
    if self.vae.max_size > self.latent_downsample * self.latent_max_side:
      raise ValueError(f"ImageTransforms: VAE max_size {self.vae.max_size} exceeds max_latent_size "
                       f"{self.latent_max_side} x {self.latent_downsample} px")

  def vit_image(self, img: Image.Image, img_num: int = 1) -> Tuple[np.ndarray, Tuple[int, int]]:
    return vit_patches(to_float(resize(img, self.vit, img_num)), self.patch)

  def vae_image(self, img: Image.Image, img_num: int = 1) -> Tuple[np.ndarray, Tuple[int, int]]:
    """([H, W, 3] in [-1, 1], latent grid (H/f, W/f))."""
    px = to_float(resize(img, self.vae, img_num))
    f = self.latent_downsample
    return px, (px.shape[0] // f, px.shape[1] // f)

  def max_vit_grid(self) -> Tuple[int, int]:
    s = self.vit.max_size // self.patch
    return s, s

  def max_latent_grid(self) -> Tuple[int, int]:
    s = self.vae.max_size // self.latent_downsample
    return s, s

