"""`bagel-serve`: the web page over a checkpoint (Gradio Blocks over `backend.Backend`).

    bagel-serve --checkpoint workdirs/demo [--step N] [--raw] [--port 7860] [--host 127.0.0.1]

Tabs: understand (image + question -> streamed answer, optional think), generate (prompt, size, steps, text /
image CFG scales, CFG interval, timestep shift, renorm, seed; a status line per denoising step), edit (upload +
instruction), think (the model writes its plan, streamed, then the image) and checkpoint (step, tokens seen,
loss curves, latest eval scores; load another checkpoint or step).

Why Gradio: it is what the field's model demos (the official BAGEL app included) are written in, it is
maintained, its components cover every control here (image upload with preview, sliders, streamed text, a
request queue with a concurrency limit) and a page comes with no front-end code of our own. Its queue runs every
model event under one concurrency slot (`concurrency_id="model"`, limit 1), and `Backend.lock` enforces the same
below it: requests wait their turn, never run together on one model. Offline by construction: analytics off,
no share link, no server-side rendering (no Node), no run history (its page offers a cloud bucket), system fonts
only (the default theme would fetch web fonts).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Any, List

# Before gradio is imported anywhere: no telemetry and no version check from a local demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
for _k in ("NO_PROXY", "no_proxy"):  # gradio checks its own startup through localhost
  os.environ[_k] = ",".join(x for x in (os.environ.get(_k, ""), "127.0.0.1,localhost") if x)

from bagel_jax import console  # noqa: E402
from bagel_jax.accelerators import use_cpu_if_no_accelerator  # noqa: E402
from bagel_jax.inference import inferencer as inf  # noqa: E402
from bagel_jax.serve import backend as backend_lib  # noqa: E402
from bagel_jax.serve.backend import Backend, Sampling, UserError  # noqa: E402
from bagel_jax.serve.handlers import (ERROR_PREFIX, Handlers, _gradio, eval_markdown,  # noqa: E402,F401
                                      header_markdown, info_markdown)

log = console.logger(__name__)
CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%; }
#und-status, #gen-status, #edit-status, #think-status, #ckpt-status { min-height: 2em; }
"""


def _upload_image_class():
  """gr.Image that hands the uploaded file's path to the handler untouched: the handler opens it and answers
  a non-image or an oversized image with a message, instead of an exception inside Gradio's own decoding."""
  gr = _gradio()

  class UploadImage(gr.Image):
    is_template = True  # Gradio's mechanism for subclasses: the front end is gr.Image's

    def preprocess(self, payload):
      if payload is None:
        return None
      return getattr(payload, "path", None)

  return UploadImage


def _sampler_controls(defaults: Sampling, model, prefix: str) -> List[Any]:
  gr = _gradio()
  with gr.Row():
    steps = gr.Slider(2, 200, value=defaults.num_timesteps, step=1, label="steps (schedule points)",
                      elem_id=f"{prefix}-steps")
    shift = gr.Slider(0.5, 10.0, value=defaults.timestep_shift, step=0.1, label="timestep shift",
                      elem_id=f"{prefix}-shift")
  with gr.Row():
    text_scale = gr.Slider(1.0, 10.0, value=defaults.cfg_text_scale, step=0.1, label="text CFG scale",
                           elem_id=f"{prefix}-cfg-text")
    img_scale = gr.Slider(1.0, 5.0, value=defaults.cfg_img_scale, step=0.1, label="image CFG scale",
                          elem_id=f"{prefix}-cfg-img")
  with gr.Row():
    lo = gr.Slider(0.0, 1.0, value=defaults.cfg_interval[0], step=0.05, label="CFG interval start (t)",
                   elem_id=f"{prefix}-cfg-lo")
    hi = gr.Slider(0.0, 1.0, value=defaults.cfg_interval[1], step=0.05, label="CFG interval end (t)",
                   elem_id=f"{prefix}-cfg-hi")
  with gr.Row():
    renorm = gr.Dropdown(["global", "channel", "text_channel"], value=defaults.cfg_renorm_type,
                         label="CFG renorm", elem_id=f"{prefix}-renorm")
    renorm_min = gr.Slider(0.0, 1.0, value=defaults.cfg_renorm_min, step=0.05, label="renorm min",
                           elem_id=f"{prefix}-renorm-min")
  del model
  return [steps, text_scale, img_scale, lo, hi, shift, renorm, renorm_min]


def build_app(backend: Backend, *, default_steps: int = 50):
  """The gr.Blocks page over `backend` (not launched)."""
  gr = _gradio()
  h = Handlers(backend)
  m = backend.model
  f, side = m.config.latent_downsample, m.config.max_latent_size
  gen_h, gen_w = m.gen_size
  shift = m.timestep_shift or 3.0
  t2i = Sampling.from_config(inf.GenerationConfig.default_t2i(num_timesteps=default_steps, timestep_shift=shift))
  edt = Sampling.from_config(inf.GenerationConfig.default_edit(num_timesteps=default_steps, timestep_shift=shift))
  UploadImage = _upload_image_class()  # pylint: disable=invalid-name
  model_events = dict(concurrency_limit=1, concurrency_id="model")

  def size_controls(prefix):
    with gr.Row():
      hh = gr.Slider(f, f * side, value=gen_h, step=f, label=f"height (px, multiple of {f})", elem_id=f"{prefix}-height")
      ww = gr.Slider(f, f * side, value=gen_w, step=f, label=f"width (px, multiple of {f})", elem_id=f"{prefix}-width")
      sd = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id=f"{prefix}-seed")
    return hh, ww, sd

  info = backend.checkpoint_info()
  with gr.Blocks(title="bagel-serve", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
    header = gr.Markdown(header_markdown(info), elem_id="header")
    with gr.Tabs(elem_id="tabs"):
      with gr.Tab("Understand", id="understand", elem_id="tab-understand"):
        with gr.Row():
          with gr.Column():
            u_img = UploadImage(type="filepath", label="image (optional)", sources=["upload", "clipboard"],
                                height=256, elem_id="und-image", elem_classes="pixelated")
            u_q = gr.Textbox(label="question", placeholder="what color is the circle?", elem_id="und-question")
            with gr.Row():
              u_think = gr.Checkbox(False, label="think first (reasoning before the answer)", elem_id="und-think")
              u_sample = gr.Checkbox(False, label="sample (else greedy)", elem_id="und-sample")
            with gr.Row():
              u_max = gr.Slider(1, backend_lib.MAX_NEW_TOKENS, value=64, step=1, label="max new tokens",
                                elem_id="und-max-tokens")
              u_temp = gr.Slider(0.05, 2.0, value=0.3, step=0.05, label="temperature", elem_id="und-temperature")
              u_seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="und-seed")
            u_run = gr.Button("Ask", variant="primary", elem_id="und-run")
          with gr.Column():
            u_answer = gr.Textbox(label="answer", lines=4, interactive=False, elem_id="und-answer")
            u_plan = gr.Textbox(label="reasoning (think mode)", lines=3, interactive=False, elem_id="und-reasoning")
            u_status = gr.Markdown(elem_id="und-status")
        u_inputs = [u_img, u_q, u_think, u_max, u_sample, u_temp, u_seed]
        u_outputs = [u_answer, u_plan, u_status]
        u_run.click(h.understand, u_inputs, u_outputs, **model_events)
        u_q.submit(h.understand, u_inputs, u_outputs, **model_events)

      with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
        with gr.Row():
          with gr.Column():
            g_prompt = gr.Textbox(label="prompt", placeholder="a red circle left of a blue square",
                                  elem_id="gen-prompt")
            g_h, g_w, g_seed = size_controls("gen")
            with gr.Accordion("sampler", open=True):
              g_sampler = _sampler_controls(t2i, m, "gen")
            g_run = gr.Button("Generate", variant="primary", elem_id="gen-run")
          with gr.Column():
            g_out = gr.Image(label="generated image", type="numpy", format="png", interactive=False, height=320,
                             elem_id="gen-image", elem_classes="pixelated")
            g_status = gr.Markdown(elem_id="gen-status")
        g_inputs = [g_prompt, g_h, g_w, g_seed] + g_sampler
        g_run.click(h.generate, g_inputs, [g_out, g_status], **model_events)

      with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
        with gr.Row():
          with gr.Column():
            e_img = UploadImage(type="filepath", label="image to edit", sources=["upload", "clipboard"],
                                height=256, elem_id="edit-image", elem_classes="pixelated")
            e_instr = gr.Textbox(label="instruction", placeholder="make the blue square red",
                                 elem_id="edit-instruction")
            e_seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="edit-seed")
            with gr.Accordion("sampler", open=False):
              e_sampler = _sampler_controls(edt, m, "edit")
            e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
          with gr.Column():
            e_out = gr.Image(label="edited image (the source's size)", type="numpy", format="png",
                             interactive=False, height=320, elem_id="edit-output", elem_classes="pixelated")
            e_status = gr.Markdown(elem_id="edit-status")
        e_run.click(h.edit, [e_img, e_instr, e_seed] + e_sampler, [e_out, e_status], **model_events)

      with gr.Tab("Think", id="think", elem_id="tab-think"):
        gr.Markdown("The model first writes its reasoning (a plan in `<think>` tags), then generates the image "
                    "from the prompt and the plan. Add an image to think about an edit instead.")
        with gr.Row():
          with gr.Column():
            t_prompt = gr.Textbox(label="prompt", placeholder="a scene that shows the opposite of a big red circle",
                                  elem_id="think-prompt")
            t_img = UploadImage(type="filepath", label="image (optional: edit)", sources=["upload", "clipboard"],
                                height=160, elem_id="think-image", elem_classes="pixelated")
            t_max = gr.Slider(1, backend_lib.MAX_NEW_TOKENS, value=64, step=1, label="max reasoning tokens",
                              elem_id="think-max-tokens")
            t_h, t_w, t_seed = size_controls("think")
            with gr.Accordion("sampler", open=False):
              t_sampler = _sampler_controls(t2i, m, "think")
            t_run = gr.Button("Think and generate", variant="primary", elem_id="think-run")
          with gr.Column():
            t_plan = gr.Textbox(label="reasoning", lines=4, interactive=False, elem_id="think-reasoning")
            t_out = gr.Image(label="generated image", type="numpy", format="png", interactive=False, height=256,
                             elem_id="think-output", elem_classes="pixelated")
            t_status = gr.Markdown(elem_id="think-status")
        t_run.click(h.think, [t_prompt, t_img, t_max, t_h, t_w, t_seed] + t_sampler, [t_plan, t_out, t_status],
                    **model_events)

      with gr.Tab("Checkpoint", id="checkpoint", elem_id="tab-checkpoint"):
        with gr.Row():
          with gr.Column(scale=3):
            c_info = gr.Markdown(info_markdown(info), elem_id="ckpt-info")
            c_eval = gr.Markdown(eval_markdown(info["eval"]), elem_id="ckpt-eval")
          with gr.Column(scale=4):
            c_curves = gr.Image(info["loss_curves"], label="loss curves", type="filepath", interactive=False,
                                elem_id="ckpt-curves")
        with gr.Row():
          c_path = gr.Textbox(info["workdir"] or info["checkpoint"], label="checkpoint (workdir, checkpoint dir or "
                              "converted release)", scale=4, elem_id="ckpt-path")
          c_step = gr.Dropdown(["latest"] + [str(s) for s in info["steps"]], value=str(info["step"]),
                               allow_custom_value=True, label="step", scale=1, elem_id="ckpt-step")
          c_raw = gr.Checkbox(info["weights"] == "params", label="raw weights (else EMA)", scale=1,
                              elem_id="ckpt-raw")
        with gr.Row():
          c_load = gr.Button("Load", variant="primary", elem_id="ckpt-load")
          c_refresh = gr.Button("Refresh (training still running?)", elem_id="ckpt-refresh")
        c_status = gr.Markdown(elem_id="ckpt-status")
        c_outputs = [header, c_info, c_curves, c_eval, c_step]
        c_load.click(h.load, [c_path, c_step, c_raw], c_outputs + [c_status], **model_events)
        c_refresh.click(h.checkpoint, None, c_outputs)
  app.queue(default_concurrency_limit=1, max_size=256)
  return app


def theme():
  gr = _gradio()
  # System fonts: the default theme's web fonts would be fetched from the internet by the browser.
  return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "Consolas", "monospace"])


def launch(app, host: str, port: int, block: bool = True):
  return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                    prevent_thread_lock=not block, max_file_size=backend_lib.MAX_UPLOAD_BYTES, ssr_mode=False,
                    mcp_server=False, run_history=False, theme=theme(), css=CSS, quiet=False)


def warmup(backend: Backend, steps: int) -> float:
  """One request of each kind, so the first user's request does not wait for compilation."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  h, w = backend.model.gen_size
  with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "warmup.png")
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(p)
    backend.understand(p, "what is in the image?", max_new_tokens=4)
    backend.generate("a red circle", sampling=Sampling(num_timesteps=steps))
    backend.generate("make it blue", image=p, sampling=Sampling.from_config(
        backend_lib.inf.GenerationConfig.default_edit(num_timesteps=steps)))
  return time.time() - t0


def main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(prog="bagel-serve", description="A local web page over a bagel-jax checkpoint: "
                               "understand, generate, edit, think, and the checkpoint's training curves and scores.")
  ap.add_argument("--checkpoint", required=True, help="training run workdir, checkpoint directory or converted "
                  "official release (bagel-convert)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
  ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
  ap.add_argument("--port", type=int, default=7860)
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, else the synthetic vocab)")
  ap.add_argument("--image-size", type=int, default=None, help="input/output image side (default: the run's)")
  ap.add_argument("--attention", default=None, help="attention_impl override (default: the checkpoint's)")
  ap.add_argument("--default-steps", type=int, default=50, help="initial value of the steps sliders")
  ap.add_argument("--warmup", action="store_true", help="compile every request kind before serving")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("httpx", "absl"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not 2 <= args.default_steps <= 200:
    ap.error("--default-steps must be from 2 to 200")
  t0 = time.time()
  try:
    backend = Backend.from_checkpoint(args.checkpoint, step=args.step, use_ema=not args.raw,
                                      tokenizer=args.tokenizer, image_size=args.image_size,
                                      attention_impl=args.attention)
  except UserError as e:
    raise SystemExit(f"bagel-serve: error: {e}") from None
  m = backend.model
  log.info("loaded step %s (%s) from %s in %.1f s", m.step, m.item, m.checkpoint_dir, time.time() - t0)
  if args.warmup:
    log.info("warm-up (compiling every request kind) took %.1f s", warmup(backend, args.default_steps))
  app = build_app(backend, default_steps=args.default_steps)
  try:
    launch(app, args.host, args.port, block=True)
  except OSError as e:
    raise SystemExit(f"bagel-serve: error: cannot listen on {args.host}:{args.port} ({e})") from None


if __name__ == "__main__":
  sys.exit(main())
