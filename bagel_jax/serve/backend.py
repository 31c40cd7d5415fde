"""The model side of `bagel-serve`: one loaded checkpoint, one lock, and the four request kinds of the page.

`Backend` is a thin layer over `bagel_jax.inference`: it opens and checks uploads, builds a `Session` the way
`bagel-sample` / `bagel-chat` do (KV capacity from `estimate_capacity`, rounded to 128 slots, so requests of
one kind share compiled steps), and reports progress through the inference hooks (`on_text` per decoded token,
`on_step` per finished denoising step). Every model call holds `Backend.lock`: requests run one at a time on
the one model, whatever the web layer does. Anything wrong with a request raises `UserError` with a message
meant for the page; the model and the server are left as they were.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from bagel_jax.data import transforms as tf
from bagel_jax.inference import inferencer as inf
from bagel_jax.inference import model as model_lib
from bagel_jax.train import metrics as metrics_lib

# Uploads above this many pixels are refused with a message (the model resizes inputs to at most its own
# image size anyway; a 6k x 6k photo is fine, a decompression bomb is not). Gradio also caps the upload's bytes.
MAX_INPUT_PIXELS = 36_000_000
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 512

OnText = Optional[Callable[[str], None]]
OnStep = Optional[Callable[[int, int], None]]


class UserError(ValueError):
  """A request the page should answer with this message (bad input, unknown checkpoint, ...)."""


# ----------------------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------------------

def open_image(path: Optional[str], what: str = "image") -> Image.Image:
  """An uploaded file -> RGB PIL image, or UserError saying why not (missing, not an image, too large)."""
  if not path:
    raise UserError(f"upload an {what} first")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"{what}: the uploaded file is gone ({os.path.basename(path)}); upload it again")
  size = os.path.getsize(path)
  if size > MAX_UPLOAD_BYTES:
    raise UserError(f"{what}: the file is {size / 2**20:.0f} MiB, over the {MAX_UPLOAD_BYTES // 2**20} MiB limit")
  name = os.path.basename(path)
  try:
    with Image.open(path) as img:
      w, h = img.size
      if w * h > MAX_INPUT_PIXELS:
        raise UserError(f"{what} is {w}x{h} px ({w * h / 1e6:.0f} megapixels), over the limit of "
                        f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels: downscale it first")
      img.load()
      return tf.to_rgb(img)
  except Image.DecompressionBombError as e:
    raise UserError(f"{what} is too large to open safely (over {MAX_INPUT_PIXELS / 1e6:.0f} megapixels): "
                    f"downscale it first") from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{what}: {name} is not an image file this app can read (PNG, JPEG, WebP, ...)") from e


def check_prompt(text: Any, what: str = "prompt") -> str:
  if text is None or not isinstance(text, str) or not text.strip():
    raise UserError(f"the {what} is empty: type something first")
  if len(text) > MAX_PROMPT_CHARS:
    raise UserError(f"the {what} has {len(text)} characters, over the limit of {MAX_PROMPT_CHARS}")
  return text.strip()


def _int(value, what: str, lo: int, hi: int) -> int:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise UserError(f"{what} must be a number, got {value!r}") from None
  if not math.isfinite(v) or v != int(v) or not lo <= v <= hi:
    raise UserError(f"{what} must be a whole number from {lo} to {hi}, got {value}")
  return int(v)


@dataclasses.dataclass
class Sampling:
  """The generation controls of the page (official names; `to_config` checks them)."""
  num_timesteps: int = 50
  cfg_text_scale: float = 4.0
  cfg_img_scale: float = 1.0
  cfg_interval: Tuple[float, float] = (0.4, 1.0)
  timestep_shift: float = 3.0
  cfg_renorm_type: str = "global"
  cfg_renorm_min: float = 0.0

  @classmethod
  def from_config(cls, g: inf.GenerationConfig) -> "Sampling":
    return cls(g.num_timesteps, g.cfg_text_scale, g.cfg_img_scale, tuple(g.cfg_interval), g.timestep_shift,
               g.cfg_renorm_type, g.cfg_renorm_min)

  def to_config(self) -> inf.GenerationConfig:
    try:
      g = inf.GenerationConfig(
          num_timesteps=_int(self.num_timesteps, "steps", 2, 1000), timestep_shift=float(self.timestep_shift),
          cfg_text_scale=float(self.cfg_text_scale), cfg_img_scale=float(self.cfg_img_scale),
          cfg_interval=(float(self.cfg_interval[0]), float(self.cfg_interval[1])),
          cfg_renorm_type=str(self.cfg_renorm_type), cfg_renorm_min=float(self.cfg_renorm_min))
      g.check()
    except (TypeError, ValueError) as e:
      raise UserError(str(e)) from e
    return g


# ----------------------------------------------------------------------------------------------------------
# Backend.
# ----------------------------------------------------------------------------------------------------------

class Backend:
  """One model per process; `lock` serialises every request on it."""

  def __init__(self, model: model_lib.LoadedModel, load_kw: Optional[Dict[str, Any]] = None):
    self.model = model
    self.load_kw = dict(load_kw or {})
    self.lock = threading.Lock()
    self.requests = 0
    self._plot_dir = tempfile.mkdtemp(prefix="bagel_serve_")
    atexit.register(shutil.rmtree, self._plot_dir, True)

  @classmethod
  def from_checkpoint(cls, path: str, *, step: Optional[int] = None, use_ema: bool = True, **load_kw) -> "Backend":
    """Loads `path` (a training workdir, a checkpoint dir or a converted release); errors are UserError."""
    return cls(_load(path, step, use_ema, load_kw), load_kw)

  # -- checkpoint ----------------------------------------------------------------------------------------
  def reload(self, path: str, step: Optional[int] = None, use_ema: bool = True) -> Dict[str, Any]:
    """Swaps in another checkpoint or step (the checkpoint panel). On any error the current model stays."""
    if not path or not str(path).strip():
      raise UserError("checkpoint path is empty")
    with self.lock:
      self.model = _load(str(path).strip(), step, use_ema, self.load_kw)
    return self.checkpoint_info()

  def checkpoint_info(self) -> Dict[str, Any]:
    """What the checkpoint panel shows: step, weights, saved steps, tokens seen, loss curves PNG, eval scores."""
    m = self.model
    ckpt = m.checkpoint_dir
    workdir = os.path.dirname(ckpt) if ckpt else ""
    info: Dict[str, Any] = dict(checkpoint=ckpt, workdir=workdir, step=m.step, weights=m.item,
                                preset=_describe(m.config), steps=[], tokens_seen=None, metrics={},
                                loss_curves=None, eval=None)
    if ckpt:
      try:
        info["steps"] = model_lib.checkpoint_steps(ckpt)
      except Exception:  # pylint: disable=broad-except
        info["steps"] = [m.step] if m.step is not None else []
    metrics_path = os.path.join(workdir, "metrics.jsonl") if workdir else ""
    rows = _read_jsonl(metrics_path) if metrics_path and os.path.isfile(metrics_path) else []
    if rows:
      upto = [r for r in rows if m.step is None or r.get("step", 0) <= m.step]
      seen = [float(r["tokens_seen"]) for r in upto if isinstance(r.get("tokens_seen"), (int, float))]
      info["tokens_seen"] = max(seen) if seen else None
      last = upto[-1] if upto else {}
      info["metrics"] = {k: last[k] for k in ("step", "loss_avg", "ce_avg", "mse_avg", "loss", "ce", "mse", "lr")
                         if isinstance(last.get(k), (int, float)) and math.isfinite(last[k])}
    png = os.path.join(workdir, "loss_curves.png") if workdir else ""
    if png and os.path.isfile(png):
      info["loss_curves"] = png
    elif rows:
      try:  # a run without the PNG yet (still training): plot its metrics now
        info["loss_curves"] = metrics_lib.plot_curves(metrics_path, os.path.join(self._plot_dir, "loss_curves.png"))
      except Exception:  # pylint: disable=broad-except
        info["loss_curves"] = None
    info["eval"] = latest_eval(workdir) if workdir else None
    return info

  # -- requests ------------------------------------------------------------------------------------------
  def understand(self, image: Optional[str], question: str, *, think: bool = False, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 0.3, top_p: float = 1.0, seed: int = 0,
                 on_text: OnText = None) -> Dict[str, Any]:
    """An answer to `question` about the uploaded image (or none): {"answer", "think", "text", "seconds"}."""
    question = check_prompt(question, "question")
    text = _text_config(max_new_tokens, do_sample, temperature, top_p)
    seed = _int(seed, "seed", 0, 2**31 - 1)
    img = open_image(image, "image") if image else None
    with self.lock:
      t0 = time.time()
      self.requests += 1
      m = self.model
      rows = [([img] if img is not None else []) + [question]]
      s = inf.Session(m, 1, inf.estimate_capacity(m, rows, text.max_new_tokens), seed)
      if think:
        s.add_system_prompt(inf.VLM_THINK_SYSTEM_PROMPT)
      if img is not None:
        _user(lambda: s.add_image([img], vae=False, vit=True, what="image"))
      s.add_text([question], "question")
      out = s.generate_text(text, on_text=None if on_text is None else (lambda t: on_text(t[0])))[0]
      seconds = time.time() - t0
    plan, answer = inf.split_think(out) if think else ("", out.strip())
    return dict(answer=answer, think=plan, text=out, seconds=seconds)

  def generate(self, prompt: str, *, image: Optional[str] = None, think: bool = False,
               sampling: Optional[Sampling] = None, height: Optional[int] = None, width: Optional[int] = None,
               seed: int = 0, max_think_tokens: int = 64, on_step: OnStep = None,
               on_text: OnText = None) -> Dict[str, Any]:
    """Text-to-image (no `image`) or an edit of `image`, optionally thinking first:
    {"image": uint8 [H, W, 3], "think": str, "seconds", "steps"}."""
    prompt = check_prompt(prompt, "instruction" if image else "prompt")
    editing = bool(image)
    base = inf.GenerationConfig.default_edit() if editing else inf.GenerationConfig.default_t2i()
    gen = (sampling or Sampling.from_config(base)).to_config()
    seed = _int(seed, "seed", 0, 2**31 - 1)
    text = _text_config(max_think_tokens, False, 0.3, 1.0)
    img = open_image(image, "image") if editing else None
    m = self.model
    if not editing:
      f, side = m.config.latent_downsample, m.config.max_latent_size
      height = _int(height, "height", f, f * side) if height else None
      width = _int(width, "width", f, f * side) if width else None
    with self.lock:
      t0 = time.time()
      self.requests += 1
      m = self.model
      rows = [([img] if editing else []) + [prompt]]
      s = inf.Session(m, 1, inf.estimate_capacity(m, rows, text.max_new_tokens), seed)
      if think:
        s.add_system_prompt(inf.GEN_THINK_SYSTEM_PROMPT)
      if editing:
        _user(lambda: s.add_image([img], what="image"))
      s.add_text([prompt], "prompt")
      plan = ""
      if think:
        plan = s.think(text, on_text=None if on_text is None else (lambda t: on_text(t[0])))[0]
      h, w = _user(lambda: s.image_size(None if editing else height, None if editing else width))
      out = s.generate_image(gen, height=h, width=w, seed=seed, on_step=on_step)[0]
      seconds = time.time() - t0
    return dict(image=out, think=plan.replace("<think>", "").replace("</think>", "").strip(), seconds=seconds,
                steps=gen.num_timesteps - 1)


def _user(fn):
  """Runs fn; a ValueError from the inference checks (image too small, size not a multiple of a latent token,
  ...) becomes a UserError with the same message."""
  try:
    return fn()
  except UserError:
    raise
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise UserError(str(e)) from e


def _text_config(max_new_tokens, do_sample, temperature, top_p) -> inf.TextConfig:
  n = _int(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS)
  if do_sample:
    if not (float(temperature) > 0 and 0 < float(top_p) <= 1):
      raise UserError(f"sampling needs temperature > 0 and 0 < top-p <= 1, got {temperature}, {top_p}")
  return inf.TextConfig(max_new_tokens=n, do_sample=bool(do_sample), temperature=float(temperature),
                        top_p=float(top_p))


def _load(path: str, step: Optional[int], use_ema: bool, load_kw: Dict[str, Any]) -> model_lib.LoadedModel:
  try:
    return model_lib.load_model(path, step=step, use_ema=use_ema, **load_kw)
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    raise UserError(f"cannot load checkpoint {path!r}: {e}") from e


def _describe(c) -> str:
  llm = c.llm
  return (f"{llm.layer_variant} decoder, {llm.num_layers} layers x {llm.hidden_size}, vocab {llm.vocab_size}; "
          f"ViT {c.vit.num_layers} x {c.vit.hidden_size}; latent /{c.latent_downsample} up to "
          f"{c.max_latent_size * c.latent_downsample} px")


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
  """metrics.jsonl rows; a line being written by a running trainer (or any unreadable line) is skipped."""
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(r, dict):
          rows.append(r)
  except OSError:
    return []
  return rows


def latest_eval(workdir: str) -> Optional[Dict[str, Any]]:
  """The newest `scores.json` under `<workdir>/eval/` (bagel-eval and the demo write them there):
  {"path", "step", "weights", "scores": {suite: headline}}."""
  root = os.path.join(workdir, "eval")
  found = []
  for dirpath, _, files in os.walk(root):
    if dirpath[len(root):].count(os.sep) > 2:
      continue
    if "scores.json" in files:
      p = os.path.join(dirpath, "scores.json")
      found.append((os.path.getmtime(p), p))
  for _, p in sorted(found, reverse=True):
    try:
      with open(p) as f:
        r = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    scores = r.get("scores") if isinstance(r, dict) else None
    if isinstance(scores, dict):
      return dict(path=p, step=r.get("step"), weights=r.get("weights"),
                  scores={k: v for k, v in scores.items() if isinstance(v, (int, float))})
  return None
