"""Source records -> interleaved sample items, for every BAGEL data kind (reference §1.5, §5.1, §5.5).

A record is a dict `{"kind", "texts", "images", "meta"}` (+ optional `latents`, `plan`): the format of every
source in `sources.py` and of the synthetic data. `texts` are strings, `images` are encoded bytes or uint8
arrays. Each kind has a fixed *plan* (the official `sequence_plan`), which `build_items` turns into
`sequence` items with the official flags:

| kind       | plan (loss items marked *)                                                        | texts / images      |
|------------|-----------------------------------------------------------------------------------|---------------------|
| text       | text*                                                                             | 1 / 0               |
| t2i        | caption (cfg) · noisy VAE*                                                        | >=1 (one drawn) / 1 |
| caption    | ViT · caption*                                                                    | 1 / 1               |
| vqa        | ViT · (question · answer*) per turn                                               | 2k / 1              |
| edit       | clean VAE (cfg) · ViT (cfg) · instruction (cfg) · noisy VAE*; for a chain, each   | n-1 / n             |
|            | intermediate target as noisy VAE* · clean VAE (cfg) · ViT (cfg) · next instruction |                     |
| video      | caption (cfg) · one `full` split of all frames, noisy*, shared timestep (diffusion forcing) | 1 / n     |
| next_frame | instruction (cfg) · (clean VAE · ViT) (cfg) per context frame · noisy VAE* (last)  | 1 / n               |
| think_t2i  | system prompt · prompt · `<think>..</think>`* · noisy VAE*                         | 2 / 1               |
| think_vqa  | system prompt · ViT · question · `<think>..</think> answer`*                       | 2 / 1               |
| interleave | the record's own `plan`: {"type": "text", "index", "loss", "cfg"}, {"type": "image", "index",   |
|            | "noisy", "vae", "vit", "cfg"} (cfg drops the clean copies only) or {"type": "video", "index": [..]} |

CFG dropout (§5.5, paper probabilities as defaults) then drops droppable conditions independently; noisy targets
and understanding data are never droppable. Every noisy image (and video group) draws its timestep logit
n ~ N(0, 1) from the sample's own RNG, so a sample is a pure function of (record, RNG seed).

Problems with a record raise `SkipSample(reason)`: `bad_field` (wrong type or count), `empty_text`,
`decode_error`, `no_latents`, `image_too_large`; the pipeline counts them by reason.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bagel_jax.data import transforms as tf
from bagel_jax.data.sequence import Item, Text, VaeImage, VideoGroup, VitImage, apply_cfg_dropout
from bagel_jax.data.transforms import SkipSample

# Shortened think-mode system prompts (the official ones in `inferencer.py` are longer English paragraphs;
# these keep the synthetic vocabulary small). A Qwen-tokenizer run can pass the official text instead.
GEN_THINK_SYSTEM_PROMPT = ("you should first think about the planning process in the mind and then generate the "
                           "image . the planning process is enclosed within <think> </think> tags .")
VLM_THINK_SYSTEM_PROMPT = ("you should first think about the reasoning process in the mind and then provide the "
                           "answer . the reasoning process is enclosed within <think> </think> tags .")

KINDS = ("text", "t2i", "caption", "vqa", "edit", "video", "next_frame", "think_t2i", "think_vqa", "interleave")
GEN_KINDS = ("t2i", "edit", "video", "next_frame", "think_t2i")
VLM_KINDS = ("caption", "vqa", "think_vqa")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """How records become items: image transforms, CFG dropout probabilities, think prompts."""
  transforms: tf.ImageTransforms
  pixel_mode: bool = True          # VAE images as pixels (VAE runs in the step) or precomputed `latents`
  vae_image_size: int = 0          # pixel mode: side of the padded VAE buffer (images must fit)
  text_dropout: float = 0.1        # paper §2.3 (the code's defaults are 0.1 / 0.3 / 0.3)
  vit_dropout: float = 0.5
  vae_dropout: float = 0.1
  edit_vit: bool = True            # ViT copy of edit sources / context frames (the paper's VAE+ViT conditioning)
  gen_think_prompt: str = GEN_THINK_SYSTEM_PROMPT
  vlm_think_prompt: str = VLM_THINK_SYSTEM_PROMPT

  def __post_init__(self):
    for name in ("text_dropout", "vit_dropout", "vae_dropout"):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"SampleConfig.{name}={p} must be a probability in [0, 1]")
    if self.pixel_mode and self.vae_image_size and self.transforms.vae.max_size > self.vae_image_size:
      raise ValueError(f"SampleConfig: VAE max_size {self.transforms.vae.max_size} exceeds the batch's "
                       f"vae_image_size {self.vae_image_size}")


# ----------------------------------------------------------------------------------------------------------
# Record normalisation: one schema whatever the source (TFDS gives bytes, JSON gives str, ...).
# ----------------------------------------------------------------------------------------------------------

def _as_str(x, where: str) -> str:
  if isinstance(x, np.ndarray) and x.ndim == 0:
    x = x.item()
  if isinstance(x, (bytes, np.bytes_)):
    return bytes(x).decode("utf-8")
  if isinstance(x, str):
    return x
  raise SkipSample("bad_field", f"{where} must be a string, got {type(x).__name__}")


def _as_list(x, where: str) -> list:
  if isinstance(x, np.ndarray) and x.dtype == np.object_ and x.ndim == 1:
    return list(x)
  if isinstance(x, (list, tuple)):
    return list(x)
  raise SkipSample("bad_field", f"{where} must be a list, got {type(x).__name__}")


def normalize_record(record: Any) -> Dict[str, Any]:
  """{"kind": str, "texts": [str], "images": [bytes|array], "meta", "latents"?: [array], "plan"?: [dict]};
  SkipSample('bad_field' / 'unknown_kind') when a field has the wrong type."""
  if not isinstance(record, dict):
    raise SkipSample("bad_field", f"record must be a dict, got {type(record).__name__}")
  if "kind" not in record:
    raise SkipSample("bad_field", "record has no 'kind'")
  kind = _as_str(record["kind"], "kind")
  if kind not in KINDS:
    raise SkipSample("unknown_kind", f"{kind!r} is not one of {KINDS}")
  texts = [_as_str(t, f"texts[{i}]") for i, t in enumerate(_as_list(record.get("texts", []), "texts"))]
  images = _as_list(record.get("images", []), "images")
  for i, im in enumerate(images):
    if not isinstance(im, (bytes, bytearray, np.bytes_, np.ndarray)):
      raise SkipSample("bad_field", f"images[{i}] must be bytes or a uint8 array, got {type(im).__name__}")
  # `meta` (ground truth for evaluation) passes through untouched: training never reads it
  out = dict(kind=kind, texts=texts, images=images, meta=record.get("meta"))
  names = record.get("_image_names")
  out["_image_names"] = list(names) if isinstance(names, list) and len(names) == len(images) else [""] * len(images)
  if record.get("latents") is not None:
    out["latents"] = _as_list(record["latents"], "latents")
  if record.get("plan") is not None:
    plan = record["plan"]
    if isinstance(plan, (str, bytes)):
      try:
        plan = json.loads(_as_str(plan, "plan"))
      except json.JSONDecodeError as e:
        raise SkipSample("bad_field", f"plan is not JSON: {e}") from e
    out["plan"] = _as_list(plan, "plan")
  return out


# ----------------------------------------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------------------------------------

def _need(kind, texts, images, n_texts, n_images):
  ok_t = n_texts(len(texts)) if callable(n_texts) else len(texts) == n_texts
  ok_i = n_images(len(images)) if callable(n_images) else len(images) == n_images
  if not (ok_t and ok_i):
    raise SkipSample("bad_field", f"kind {kind!r} got {len(texts)} texts and {len(images)} images")


def T(i, loss=False, cfg=False):
  return dict(type="text", index=i, loss=bool(loss), cfg=bool(cfg))


def I(i, noisy=False, vae=False, vit=False, cfg=False):  # noqa: E743
  return dict(type="image", index=i, noisy=bool(noisy), vae=bool(vae), vit=bool(vit), cfg=bool(cfg))


def make_plan(rec: Dict[str, Any], rng: np.random.Generator, cfg: SampleConfig) -> List[dict]:
  """The kind's sequence plan; texts are referenced by index into rec['texts'] (a special index -1 is the
  think system prompt)."""
  kind, texts, images = rec["kind"], rec["texts"], rec["images"]
  if kind == "text":
    _need(kind, texts, images, 1, 0)
    return [T(0, loss=True)]
  if kind == "t2i":
    _need(kind, texts, images, lambda n: n >= 1, 1)
    return [T(int(rng.integers(len(texts))), cfg=True), I(0, noisy=True)]
  if kind == "caption":
    _need(kind, texts, images, 1, 1)
    return [I(0, vit=True), T(0, loss=True)]
  if kind == "vqa":
    _need(kind, texts, images, lambda n: n >= 2 and n % 2 == 0, 1)
    plan = [I(0, vit=True)]
    for k in range(0, len(texts), 2):
      plan += [T(k), T(k + 1, loss=True)]
    return plan
  if kind == "edit":
    _need(kind, texts, images, lambda n: n == len(images) - 1, lambda n: n >= 2)
    vit = cfg.edit_vit
    plan = [I(0, vae=True, vit=vit, cfg=True), T(0, cfg=True)]
    for k in range(1, len(images) - 1):  # intermediate targets: noisy, then clean copies as context
      plan += [I(k, noisy=True, vae=True, vit=vit, cfg=True), T(k, cfg=True)]
    return plan + [I(len(images) - 1, noisy=True)]
  if kind == "video":
    _need(kind, texts, images, 1, lambda n: n >= 1)
    return [T(0, cfg=True), dict(type="video", index=list(range(len(images))), noisy=True,
                                  deltas=[1] * len(images))]
  if kind == "next_frame":
    _need(kind, texts, images, 1, lambda n: n >= 2)
    plan = [T(0, cfg=True)]
    for k in range(len(images) - 1):
      plan.append(I(k, vae=True, vit=cfg.edit_vit, cfg=True))
    return plan + [I(len(images) - 1, noisy=True)]
  if kind == "think_t2i":
    _need(kind, texts, images, 2, 1)
    return [T(-1), T(0), T(1, loss=True), I(0, noisy=True)]
  if kind == "think_vqa":
    _need(kind, texts, images, 2, 1)
    return [T(-1), I(0, vit=True), T(0), T(1, loss=True)]
  if kind == "interleave":
    if "plan" not in rec:
      raise SkipSample("bad_field", "kind 'interleave' needs a 'plan'")
    return [_check_plan_item(p, len(texts), len(images)) for p in rec["plan"]]
  raise SkipSample("unknown_kind", kind)


def _check_plan_item(p, n_texts, n_images) -> dict:
  if not isinstance(p, dict) or p.get("type") not in ("text", "image", "video"):
    raise SkipSample("bad_field", f"plan item {p!r} needs type text|image|video")
  idx = p.get("index")
  idxs = idx if p["type"] == "video" else [idx]
  if not isinstance(idxs, list) or not all(isinstance(i, int) for i in idxs):
    raise SkipSample("bad_field", f"plan item {p!r}: bad index")
  limit = n_texts if p["type"] == "text" else n_images
  if any(not 0 <= i < limit for i in idxs):
    raise SkipSample("bad_field", f"plan item {p!r}: index outside [0, {limit})")
  if p["type"] == "text":
    return T(idx, p.get("loss", False), p.get("cfg", False))
  if p["type"] == "image":
    if not (p.get("noisy") or p.get("vae") or p.get("vit")):
      raise SkipSample("bad_field", f"plan item {p!r}: an image needs noisy, vae or vit")
    return I(idx, p.get("noisy", False), p.get("vae", False), p.get("vit", False), p.get("cfg", False))
  deltas = p.get("deltas", [1] * len(idxs))
  return dict(type="video", index=idxs, noisy=bool(p.get("noisy", True)), deltas=[int(d) for d in deltas])


# ----------------------------------------------------------------------------------------------------------
# Items.
# ----------------------------------------------------------------------------------------------------------

class _Images:
  """Decodes each image of a record at most once per representation."""

  def __init__(self, rec, cfg: SampleConfig):
    self.rec, self.cfg = rec, cfg
    # max_pixels is shared by the images of a sample only for understanding (VLM) data, as in the official
    # vlm_dataset (`img_num=len(images)`); edit/interleave data transform each image alone.
    self.n = len(rec["images"]) if rec["kind"] in VLM_KINDS else 1
    self._pil: Dict[int, Any] = {}

  def pil(self, i):
    if i not in self._pil:
      name = self.rec["_image_names"][i]
      self._pil[i] = tf.decode(self.rec["images"][i], where=f"images[{i}]" + (f" ({name})" if name else ""))
    return self._pil[i]

  def vit(self, i, cfg_flag=False) -> VitImage:
    patches, grid = self.cfg.transforms.vit_image(self.pil(i), self.n)
    return VitImage(patches, grid, cfg=cfg_flag)

  def vae(self, i, noisy=False, t_logit=0.0, cfg_flag=False) -> VaeImage:
    if not self.cfg.pixel_mode:
      lats = self.rec.get("latents")
      if lats is None or i >= len(lats) or lats[i] is None:
        raise SkipSample("no_latents", f"images[{i}] has no precomputed latents (latent-mode batch)")
      lat = np.asarray(lats[i], np.float32)
      if lat.ndim != 3:
        raise SkipSample("bad_field", f"latents[{i}] must be [h, w, C], got shape {lat.shape}")
      h, w, c = lat.shape
      return VaeImage((h, w), latents=lat.reshape(h * w, c), noisy=noisy, t_logit=t_logit, cfg=cfg_flag)
    px, grid = self.cfg.transforms.vae_image(self.pil(i), 1)
    s = self.cfg.vae_image_size
    if s and (px.shape[0] > s or px.shape[1] > s):
      raise SkipSample("image_too_large", f"images[{i}] resized to {px.shape[:2]} > vae_image_size {s}")
    return VaeImage(grid, pixels=px, noisy=noisy, t_logit=t_logit, cfg=cfg_flag)


def build_items(record: Any, tokenizer, cfg: SampleConfig, rng: np.random.Generator) -> List[Item]:
  """One record -> items (CFG dropout applied). Raises SkipSample for records that cannot be used."""
  rec = normalize_record(record)
  plan = make_plan(rec, rng, cfg)
  system = cfg.gen_think_prompt if rec["kind"] == "think_t2i" else cfg.vlm_think_prompt
  images = _Images(rec, cfg)
  items: List[Item] = []
  for p in plan:
    if p["type"] == "text":
      text = system if p["index"] == -1 else rec["texts"][p["index"]]
      ids = tokenizer.encode(text) if text.strip() else []
      if not ids:
        raise SkipSample("empty_text", f"texts[{p['index']}] of a {rec['kind']!r} record is empty")
      items.append(Text(ids, loss=p["loss"], cfg=p["cfg"]))
    elif p["type"] == "image":
      i = p["index"]
      if p["noisy"]:
        items.append(images.vae(i, noisy=True, t_logit=float(rng.normal())))
      if p["vae"]:
        items.append(images.vae(i, cfg_flag=p["cfg"]))
      if p["vit"]:
        items.append(images.vit(i, cfg_flag=p["cfg"]))
    else:
      t_logit = float(rng.normal()) if p["noisy"] else 0.0
      frames = [images.vae(i) for i in p["index"]]
      grids = {f.grid for f in frames}
      if len(grids) != 1:
        raise SkipSample("bad_field", f"video frames have different sizes {sorted(grids)}")
      items.append(VideoGroup(frames, p["deltas"], noisy=p["noisy"], t_logit=t_logit))
  return apply_cfg_dropout(items, rng, cfg.text_dropout, cfg.vit_dropout, cfg.vae_dropout)


def has_loss(items: Sequence[Item]) -> bool:
  return any((isinstance(i, Text) and i.loss) or (isinstance(i, VaeImage) and i.noisy) or
             (isinstance(i, VideoGroup) and i.noisy) for i in items)


def default_transforms(model_cfg, *, gen_size=(32, 32), und_size=(32, 64), und_max_pixels: Optional[int] = None,
                       gen_max_pixels: Optional[int] = None) -> tf.ImageTransforms:
  """Transforms for a model config: `gen_size` = (min short edge, max long edge) of VAE images, `und_size` the
  same for ViT images (paper Table 3 uses (256, 512) / (224, 980) in PT; the tiny CPU runs use 32 px)."""
  f = model_cfg.latent_downsample
  p = model_cfg.vit.patch_size
  vae = tf.ResizeRule(max_size=int(gen_size[1]), min_size=int(gen_size[0]), stride=f,
                      max_pixels=int(gen_max_pixels or gen_size[1] ** 2))
  vit = tf.ResizeRule(max_size=int(und_size[1]), min_size=int(und_size[0]), stride=p,
                      max_pixels=int(und_max_pixels or und_size[1] ** 2))
  return tf.ImageTransforms(vit=vit, vae=vae, patch=p, vit_max_side=model_cfg.vit.max_patches_per_side,
                            latent_downsample=f, latent_max_side=model_cfg.max_latent_size)
