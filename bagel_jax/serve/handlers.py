"""The page's event handlers (`Handlers`, plain generators over a `backend.Backend`, so tests drive them without a
browser), the worker thread that runs one request off the event loop with progress events, and the markdown
of the checkpoint tab. `app.py` wires them into the Gradio page.
"""
from __future__ import annotations

import atexit
import collections
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from bagel_jax import console
from bagel_jax.inference import inferencer as inf
from bagel_jax.serve import backend as backend_lib
from bagel_jax.serve.backend import Backend, Sampling, UserError

log = console.logger(__name__)

ERROR_PREFIX = "Error:"


def _gradio():
  import gradio as gr  # pylint: disable=import-outside-toplevel
  return gr


# ----------------------------------------------------------------------------------------------------------
# Running a request off the event thread, with progress events.
# ----------------------------------------------------------------------------------------------------------

def run_with_events(job: Callable[[Callable[..., None]], Any]) -> Iterator[Tuple]:
  """Runs job(emit) in a worker thread and yields its events: whatever it emits ("text", str) / ("step", k, n),
  then ("done", result) or ("error", message). Bursts are coalesced: of several queued progress events only the
  newest is yielded. The worker finishes its request even if the page goes away (the model lock is released
  by the request itself)."""
  q: "queue.Queue[Tuple]" = queue.Queue()

  def work():
    try:
      q.put(("done", job(lambda *ev: q.put(ev))))
    except UserError as e:
      q.put(("error", str(e)))
    except Exception as e:  # pylint: disable=broad-except
      log.exception("request failed")
      q.put(("error", f"internal error ({type(e).__name__}: {e}); the server keeps running"))

  threading.Thread(target=work, daemon=True, name="bagel-serve-request").start()
  while True:
    evs = [q.get()]
    while True:
      try:
        evs.append(q.get_nowait())
      except queue.Empty:
        break
    final = [e for e in evs if e[0] in ("done", "error")]
    latest: Dict[str, Tuple] = {}
    for e in evs:
      if e[0] not in ("done", "error"):
        latest[e[0]] = e
    yield from latest.values()
    if final:
      yield final[0]
      return


def error_text(msg: str) -> str:
  return f"{ERROR_PREFIX} {msg}"


def _split_live(text: str) -> Tuple[str, str]:
  """Streaming think text: (plan so far, answer so far)."""
  if "</think>" in text:
    return inf.split_think(text)
  return text.replace("<think>", "").strip(), ""


# ----------------------------------------------------------------------------------------------------------
# Event handlers (generators: every yield updates the page).
# ----------------------------------------------------------------------------------------------------------

class Handlers:
  """The page's callbacks over one Backend; plain generators, so tests can drive them without a browser."""

  KEEP_FILES = 64

  def __init__(self, backend: Backend):
    self.backend = backend
    self.out_dir = tempfile.mkdtemp(prefix="bagel_serve_out_")
    atexit.register(shutil.rmtree, self.out_dir, True)
    self._files: "collections.deque[str]" = collections.deque()
    self._files_lock = threading.Lock()

  def save_png(self, image) -> str:
    """A result image as a PNG file of its own, written atomically, under a fresh name. Handing Gradio an array
    instead makes it write the PNG to a path named by the content's hash: two requests with identical results
    (same prompt and seed) then rewrite one file while it is being downloaded, and a client gets an empty or
    truncated image (seen in benchmarks/serve_load.py). Gradio copies the file into its cache; only the newest
    KEEP_FILES stay here."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    path = os.path.join(self.out_dir, f"{uuid.uuid4().hex}.png")
    Image.fromarray(image).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
    with self._files_lock:
      self._files.append(path)
      while len(self._files) > self.KEEP_FILES:
        try:
          os.remove(self._files.popleft())
        except OSError:
          pass
    return path

  def understand(self, image, question, think, max_new_tokens, do_sample, temperature, seed):
    gr = _gradio()
    t0 = time.time()
    yield "", "", "thinking ..." if think else "reading the image ..." if image else "answering ..."
    n = 0
    for ev in run_with_events(lambda emit: self.backend.understand(
        image, question, think=bool(think), max_new_tokens=max_new_tokens, do_sample=bool(do_sample),
        temperature=temperature, seed=seed, on_text=lambda t: emit("text", t))):
      if ev[0] == "text":
        n += 1
        plan, answer = _split_live(ev[1]) if think else ("", ev[1])
        yield answer, plan, f"decoding ... ({time.time() - t0:.1f} s)"
      elif ev[0] == "error":
        yield gr.skip(), gr.skip(), error_text(ev[1])
      else:
        r = ev[1]
        shown = r["answer"] if r["answer"] else "(the model answered with an empty text)"
        yield shown, r["think"], f"answered in {r['seconds']:.1f} s"

  def _image_job(self, outputs_think: bool, prompt, image, think, sampling, height, width, seed,
                 max_think_tokens):
    gr = _gradio()
    t0 = time.time()
    skip = (gr.skip(),) if outputs_think else ()
    yield skip + (gr.skip(), "queued / preparing ...")
    for ev in run_with_events(lambda emit: self.backend.generate(
        prompt, image=image, think=bool(think), sampling=sampling, height=height, width=width, seed=seed,
        max_think_tokens=max_think_tokens, on_step=lambda k, n: emit("step", k, n),
        on_text=lambda t: emit("text", t))):
      if ev[0] == "text":
        plan = ev[1].replace("<think>", "").replace("</think>", "").strip()
        yield ((plan,) if outputs_think else ()) + (gr.skip(), f"thinking ... ({time.time() - t0:.1f} s)")
      elif ev[0] == "step":
        yield skip + (gr.skip(), f"denoising step {ev[1]}/{ev[2]} ({time.time() - t0:.1f} s)")
      elif ev[0] == "error":
        yield skip + (gr.skip(), error_text(ev[1]))
      else:
        r = ev[1]
        h, w = r["image"].shape[:2]
        yield (((r["think"],) if outputs_think else ()) +
               (self.save_png(r["image"]), f"done: {w}x{h} px, {r['steps']}/{r['steps']} denoising steps, {r['seconds']:.1f} s"))

  def generate(self, prompt, height, width, seed, *sampler):
    yield from self._image_job(False, prompt, None, False, sampling_from(sampler), height, width, seed, 64)

  def edit(self, image, instruction, seed, *sampler):
    if not image:
      yield _gradio().skip(), error_text("upload an image to edit first")
      return
    yield from self._image_job(False, instruction, image, False, sampling_from(sampler), None, None, seed, 64)

  def think(self, prompt, image, max_think_tokens, height, width, seed, *sampler):
    yield from self._image_job(True, prompt, image or None, True, sampling_from(sampler), height, width, seed,
                               max_think_tokens)

  def checkpoint(self):
    """(header, info markdown, loss curves, eval markdown, steps dropdown update)."""
    gr = _gradio()
    info = self.backend.checkpoint_info()
    choices = ["latest"] + [str(s) for s in info["steps"]]
    return (header_markdown(info), info_markdown(info), info["loss_curves"], eval_markdown(info["eval"]),
            gr.update(choices=choices, value=str(info["step"]) if info["step"] is not None else "latest"))

  def load(self, path, step, raw):
    gr = _gradio()
    try:
      s = None if step in (None, "", "latest") else backend_lib._int(step, "step", 0, 10**12)  # pylint: disable=protected-access
      self.backend.reload(path, s, use_ema=not raw)
    except UserError as e:
      return (gr.skip(),) * 5 + (error_text(str(e)),)
    info = self.backend.checkpoint_info()
    return self.checkpoint() + (f"loaded step {info['step']} ({_weights(info['weights'])}) from "
                                f"{info['checkpoint']}",)


def sampling_from(values) -> Sampling:
  steps, text_scale, img_scale, lo, hi, shift, renorm, renorm_min = values
  return Sampling(num_timesteps=steps, cfg_text_scale=text_scale, cfg_img_scale=img_scale, cfg_interval=(lo, hi),
                  timestep_shift=shift, cfg_renorm_type=renorm, cfg_renorm_min=renorm_min)


# ----------------------------------------------------------------------------------------------------------
# Markdown of the checkpoint panel.
# ----------------------------------------------------------------------------------------------------------

def _tokens(n: Optional[float]) -> str:
  if n is None:
    return "unknown (no metrics.jsonl beside the checkpoint)"
  for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= div:
      return f"{n / div:.2f}{unit} ({int(n):,})"
  return f"{int(n):,}"


def _weights(item: str) -> str:
  return "EMA weights" if item == "ema" else "raw weights"


def header_markdown(info: Dict[str, Any]) -> str:
  return (f"## BAGEL-jax · step {info['step']} ({_weights(info['weights'])})\n"
          f"`{info['checkpoint']}` · {info['preset']}")


def info_markdown(info: Dict[str, Any]) -> str:
  rows = [("checkpoint", f"`{info['checkpoint']}`"), ("step", str(info["step"])),
          ("weights", _weights(info["weights"])),
          ("saved steps", ", ".join(map(str, info["steps"])) or "-"), ("tokens seen", _tokens(info["tokens_seen"])),
          ("model", info["preset"])]
  for k, v in info["metrics"].items():
    rows.append((f"{k} (last log)", f"{v:.4g}" if isinstance(v, float) else str(v)))
  return "| run | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def eval_markdown(ev: Optional[Dict[str, Any]]) -> str:
  if not ev:
    return "No evaluation yet: `bagel-eval --checkpoint WORKDIR` writes `eval/step_N/scores.json`."
  head = (f"**Latest eval scores**: step {ev['step']}, {_weights(str(ev['weights']))}, from `{ev['path']}`\n\n")
  return head + "| suite | score |\n|---|---|\n" + "\n".join(f"| {k} | {v:.3f} |" for k, v in ev["scores"].items())


# ----------------------------------------------------------------------------------------------------------
# The page.
# ----------------------------------------------------------------------------------------------------------
