"""Command lines: `bagel-sample` (text-to-image, editing, think mode) and `bagel-chat` (understanding).

    bagel-sample --checkpoint DIR --prompt "a red circle" [--image in.png] [--think] --out out.png
    bagel-sample --checkpoint DIR --batch prompts.jsonl --out-dir samples/
        one JSON object per line: {"prompt": str, "image": path (edit), "think": bool, "seed": int, "out": name}
    bagel-chat --checkpoint DIR --image x.png --question "what color is the circle ?"
    bagel-chat --checkpoint DIR --image x.png            # interactive: one question per line, multi-turn
    bagel-chat --checkpoint DIR --batch questions.jsonl  # {"image": path, "question": str} -> JSONL answers

A progress bar runs over the denoising steps. Each request's initial noise comes from its own seed, so a
result does not depend on which requests were batched with it; in --batch mode a request without "seed" gets
`--seed` + its line index (0-based), so repeated prompts give different images and a rerun gives the same ones.
Both commands print what they loaded (checkpoint and step, EMA or raw weights, tokenizer, image sizes). A
checkpoint converted from an official release (`bagel-convert bagel`, no training run beside it) runs with the
tokenizer stored at conversion and the image sizes of its own position tables, without --tokenizer or
--image-size. Bad input (a missing or non-image file, an image
smaller than one patch, an empty prompt, a checkpoint of another architecture) exits with a message naming it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.accelerators import use_cpu_if_no_accelerator
from bagel_jax.convert.bagel import SOURCE_FILES
from bagel_jax.inference import inferencer as inf
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib


def _add_model_args(ap: argparse.ArgumentParser):
  ap.add_argument("--checkpoint", required=True, help="training run workdir or checkpoint directory")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, else the synthetic vocab)")
  ap.add_argument("--image-size", type=int, default=None, help="input/output image side (default: the run's)")
  ap.add_argument("--expect-preset", default=None, help="fail unless the checkpoint is this preset "
                  f"({', '.join(config_lib.PRESETS)})")
  ap.add_argument("--expect-variant", default="mot", choices=config_lib.LAYER_VARIANTS)
  ap.add_argument("--attention", default=None, help="attention_impl override (default: the checkpoint's; the "
                  "Pallas kernel falls back to the reference off TPU)")
  ap.add_argument("--batch-size", type=int, default=4, help="requests per batch in --batch mode")


def converted_defaults(path: str) -> Dict[str, Any]:
  """For a checkpoint with no training run beside it (a converted release): the tokenizer the converter stored
  (`source_files/tokenizer.json`) and image sizes from the model's own tables, as the official inference uses
  them: generation up to max_latent_size x latent_downsample px (min edge half of it; 512-1024 for the 7B),
  understanding up to the ViT grid x patch (min 224; 224-980). {} for anything else: a training run (its
  config.json rules) or a checkpoint without the converter's `source_files/`."""
  ckpt_dir, workdir = model_lib.resolve_checkpoint_dir(path)
  if model_lib.read_run_config(workdir) is not None or not os.path.isdir(os.path.join(ckpt_dir, SOURCE_FILES)):
    return {}  # a training run, or a bare params checkpoint (its sizes: load_model's defaults)
  cfg = ckpt_lib.read_model_config(ckpt_dir)
  out: Dict[str, Any] = {}
  tok = os.path.join(ckpt_dir, SOURCE_FILES, "tokenizer.json")
  if os.path.isfile(tok):
    out["tokenizer"] = tok
  gen = cfg.max_latent_size * cfg.latent_downsample
  patch = cfg.vit.patch_size
  und = cfg.vit.max_patches_per_side * patch
  out["gen_size"] = (max(cfg.latent_downsample, gen // 2 // cfg.latent_downsample * cfg.latent_downsample), gen)
  out["und_size"] = (max(patch, min(224, und) // patch * patch), und)
  return out


def describe(model: model_lib.LoadedModel, source: str = "") -> str:
  """One line: what was loaded (checkpoint, step, EMA or raw, model, tokenizer, image sizes)."""
  c = model.config
  tok = model.tokenizer
  tok_name = f"{getattr(tok, 'path', '') or 'the synthetic word vocabulary'} ({type(tok).__name__}, vocab " \
             f"{tok.vocab_size})"
  t = model.transforms
  h, w = model.gen_size
  return (f"loaded {model.checkpoint_dir or '(in memory)'} step {model.step} "
          f"({'EMA' if model.item == 'ema' else 'raw'} weights); LLM {c.llm.num_layers} layers x "
          f"{c.llm.hidden_size} ({c.llm.layer_variant}), vocab {c.llm.vocab_size}; tokenizer {tok_name}; images: "
          f"generated {h}x{w}, VAE side {t.vae.min_size}-{t.vae.max_size} px, ViT side {t.vit.min_size}-"
          f"{t.vit.max_size} px" + (f"; {source}" if source else ""))


def _load(args) -> model_lib.LoadedModel:
  expect = config_lib.get_preset(args.expect_preset, args.expect_variant) if args.expect_preset else None
  conv = converted_defaults(args.checkpoint)
  kw: Dict[str, Any] = dict(tokenizer=args.tokenizer, image_size=args.image_size)
  source = ""
  if conv:
    source = "converted checkpoint: tokenizer and sizes from the conversion"
    if args.tokenizer is None and "tokenizer" in conv:
      kw["tokenizer"] = conv["tokenizer"]
    if args.image_size is None:
      kw.update(gen_size=conv["gen_size"], und_size=conv["und_size"])
  model = model_lib.load_model(args.checkpoint, step=args.step, use_ema=not args.raw, expect=expect,
                               attention_impl=args.attention, **kw)
  print(describe(model, source), file=sys.stderr, flush=True)
  return model


def read_jsonl(path: str, required: str) -> List[Dict[str, Any]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such JSONL file {path}")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      if not isinstance(row, dict) or required not in row:
        raise ValueError(f"{path}:{n}: each line must be a JSON object with a {required!r} field")
      rows.append(row)
  if not rows:
    raise ValueError(f"{path} holds no requests")
  return rows


def _fail(prog: str, e: Exception):
  raise SystemExit(f"{prog}: error: {e}")


# ----------------------------------------------------------------------------------------------------------
# bagel-sample.
# ----------------------------------------------------------------------------------------------------------

def _gen_config(args, editing: bool) -> inf.GenerationConfig:
  base = inf.GenerationConfig.default_edit() if editing else inf.GenerationConfig.default_t2i()
  kw = dict(num_timesteps=args.num_timesteps, timestep_shift=args.timestep_shift, cfg_text_scale=args.cfg_text_scale)
  if args.cfg_img_scale is not None:
    kw["cfg_img_scale"] = args.cfg_img_scale
  if args.cfg_interval is not None:
    kw["cfg_interval"] = tuple(args.cfg_interval)
  if args.cfg_renorm_type is not None:
    kw["cfg_renorm_type"] = args.cfg_renorm_type
  kw["cfg_renorm_min"] = args.cfg_renorm_min
  return dataclasses.replace(base, **kw)


def request_seed(request: Dict[str, Any], index: int, base: int) -> int:
  """The request's own "seed", else `base` + its index: requests without a seed never share one."""
  seed = request.get("seed")
  if seed is None:
    return int(base) + int(index)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"request {index + 1}: seed must be an integer, got {seed!r}")
  return seed


def run_requests(model: model_lib.LoadedModel, requests: List[Dict[str, Any]], args) -> List[Dict[str, Any]]:
  """Groups requests by structure (edit or not, think or not), runs each group in batches; returns per request
  {"image": uint8 array, "think": str | None} in input order."""
  results: List[Optional[Dict[str, Any]]] = [None] * len(requests)
  groups: Dict[tuple, List[int]] = {}
  for i, r in enumerate(requests):
    inf.check_text(r.get("prompt"), f"request {i + 1} prompt")
    groups.setdefault((bool(r.get("image")), bool(r.get("think", args.think))), []).append(i)
  bar = tqdm(total=len(requests), desc="requests", disable=len(requests) == 1)
  for (editing, think), idx in groups.items():
    gen = _gen_config(args, editing)
    for k in range(0, len(idx), max(1, args.batch_size)):
      chunk = idx[k:k + max(1, args.batch_size)]
      rows = [([requests[i]["image"]] if editing else []) + [requests[i]["prompt"]] for i in chunk]
      cap = inf.estimate_capacity(model, rows, args.max_think_tokens)
      s = inf.Session(model, len(chunk), cap, seed=args.seed)
      if think:
        s.add_system_prompt(inf.GEN_THINK_SYSTEM_PROMPT)
      if editing:
        s.add_image([requests[i]["image"] for i in chunk], what="input image")
      s.add_text([requests[i]["prompt"] for i in chunk], "prompt")
      thinks = s.think(inf.TextConfig(max_new_tokens=args.max_think_tokens)) if think else [None] * len(chunk)
      h, w = s.image_size(args.height, args.width)
      f = model.config.latent_downsample
      seeds = [request_seed(requests[i], i, args.seed) for i in chunk]
      noise = np.stack([np.asarray(jax.random.normal(jax.random.key(sd), ((h // f) * (w // f),
                                                                          model.config.latent_channels)))
                        for sd in seeds])
      images = s.generate_image(gen, height=h, width=w, noise=noise, progress=True)
      for i, img, th in zip(chunk, images, thinks):
        results[i] = dict(image=img, think=th)
      bar.update(len(chunk))
  bar.close()
  return results


def sample_main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(prog="bagel-sample", description="Text-to-image, editing and think-mode "
                               "generation from a bagel-jax checkpoint.")
  _add_model_args(ap)
  ap.add_argument("--prompt", help="the prompt (or the edit instruction with --image)")
  ap.add_argument("--image", default=None, help="source image to edit")
  ap.add_argument("--think", action="store_true", help="generate a <think> plan before the image")
  ap.add_argument("--out", default="sample.png", help="output PNG (single request)")
  ap.add_argument("--batch", default=None, help="JSONL of requests (see the module doc)")
  ap.add_argument("--out-dir", default="samples", help="output directory in --batch mode")
  ap.add_argument("--height", type=int, default=None)
  ap.add_argument("--width", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0, help="noise seed; --batch: the base seed of requests without "
                  "their own (request i gets seed + i)")
  ap.add_argument("--num-timesteps", type=int, default=50)
  ap.add_argument("--timestep-shift", type=float, default=3.0)
  ap.add_argument("--cfg-text-scale", type=float, default=4.0)
  ap.add_argument("--cfg-img-scale", type=float, default=None, help="default 1.0 (T2I) / 2.0 (edit)")
  ap.add_argument("--cfg-interval", type=float, nargs=2, default=None, help="default 0.4 1.0 (T2I) / 0 1 (edit)")
  ap.add_argument("--cfg-renorm-type", default=None, choices=("global", "channel", "text_channel"),
                  help="default global (T2I) / text_channel (edit)")
  ap.add_argument("--cfg-renorm-min", type=float, default=0.0)
  ap.add_argument("--max-think-tokens", type=int, default=64)
  args = ap.parse_args(argv)
  if (args.prompt is None) == (args.batch is None):
    ap.error("give exactly one of --prompt or --batch")
  try:
    if args.batch:
      requests = read_jsonl(args.batch, "prompt")
    else:
      requests = [dict(prompt=args.prompt, image=args.image, think=args.think, seed=args.seed)]
    for i, r in enumerate(requests):  # cheap checks before loading anything
      inf.check_text(r.get("prompt"), "prompt" if len(requests) == 1 else f"request {i + 1} prompt")
    model = _load(args)
    for i, r in enumerate(requests):  # fail before any compute on a bad image
      if r.get("image"):
        inf.prepare_image(model, r["image"], "input image" if len(requests) == 1 else f"request {i + 1} image")
    results = run_requests(model, requests, args)
  except (ValueError, FileNotFoundError, TypeError) as e:
    _fail("bagel-sample", e)
  if args.batch:
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.jsonl"), "w") as f:
      for i, (r, res) in enumerate(zip(requests, results)):
        name = r.get("out") or f"{i:05d}.png"
        Image.fromarray(res["image"]).save(os.path.join(args.out_dir, name))
        f.write(json.dumps(dict(prompt=r["prompt"], image=r.get("image"), out=name, think=res["think"])) + "\n")
    print(f"wrote {len(results)} images and results.jsonl to {args.out_dir}")
  else:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(results[0]["image"]).save(args.out)
    if results[0]["think"] is not None:
      print(f"think: {results[0]['think']}")
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------------
# bagel-chat.
# ----------------------------------------------------------------------------------------------------------

def chat_main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(prog="bagel-chat", description="Image understanding (VQA / chat) with a "
                               "bagel-jax checkpoint.")
  _add_model_args(ap)
  ap.add_argument("--image", default=None, help="image to talk about")
  ap.add_argument("--question", default=None, help="one question (omit for an interactive multi-turn chat)")
  ap.add_argument("--batch", default=None, help="JSONL of {\"image\", \"question\"} requests")
  ap.add_argument("--out", default=None, help="--batch mode: write answers as JSONL here (default stdout)")
  ap.add_argument("--think", action="store_true", help="reason in <think> tags before answering")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
  ap.add_argument("--temperature", type=float, default=0.3)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--capacity", type=int, default=1024, help="KV slots of an interactive conversation")
  args = ap.parse_args(argv)
  text = inf.TextConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                        top_p=args.top_p)
  try:
    if args.question is not None:
      inf.check_text(args.question, "question")
    model = _load(args)
    if args.batch:
      reqs = read_jsonl(args.batch, "question")
      answers: List[str] = []
      groups: Dict[bool, List[int]] = {}
      for i, r in enumerate(reqs):
        inf.check_text(r["question"], f"request {i + 1} question")
        if r.get("image"):
          inf.prepare_image(model, r["image"], f"request {i + 1} image")
        groups.setdefault(bool(r.get("image")), []).append(i)
      answers = [""] * len(reqs)
      for has_img, idx in groups.items():
        for k in range(0, len(idx), max(1, args.batch_size)):
          chunk = idx[k:k + max(1, args.batch_size)]
          got = inf.understand(model, [reqs[i]["image"] for i in chunk] if has_img else None,
                               [reqs[i]["question"] for i in chunk], think=args.think, text=text, seed=args.seed)
          for i, a in zip(chunk, got):
            answers[i] = a
      out = open(args.out, "w") if args.out else sys.stdout
      for r, a in zip(reqs, answers):
        out.write(json.dumps(dict(image=r.get("image"), question=r["question"], answer=a)) + "\n")
      if args.out:
        out.close()
      return
    if args.question is not None:
      print(inf.understand(model, [args.image] if args.image else None, [args.question], think=args.think,
                           text=text, seed=args.seed)[0])
      return
    _interactive(model, args, text)
  except (ValueError, FileNotFoundError, TypeError) as e:
    _fail("bagel-chat", e)


def _interactive(model: model_lib.LoadedModel, args, text: inf.TextConfig):
  """Multi-turn: every question and answer stays in the context, as alternating text segments (VLM data)."""
  s = inf.Session(model, 1, capacity=args.capacity, seed=args.seed)
  if args.think:
    s.add_system_prompt(inf.VLM_THINK_SYSTEM_PROMPT)
  if args.image:
    s.add_image([args.image], vae=False, vit=True, what="image")
  print("type a question (empty line or EOF to quit)", file=sys.stderr)
  for line in sys.stdin:
    q = line.strip()
    if not q:
      break
    s.add_text([q], "question")
    answer = s.generate_text(text)[0]
    print(answer, flush=True)
    if answer.strip():
      s.add_text([answer], "answer")


if __name__ == "__main__":
  sample_main()
