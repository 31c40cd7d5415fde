"""The shared recipe of the own-data configs: the tiny preset on CPU, the sources taken from manifests.

Typed args common to every own-data config (`parse_arg`; a wrong name or type fails naming it):
  steps, image_size (px; a multiple of 8, the tiny VAE's and ViT's stride), batch_size, seq_len, lr, seed,
  variant (mot/dense/moe/moe_topk), ema (EMA decay, 0 = off), tokenizer (a tokenizer.json, e.g. from
  `python -m bagel_jax.data.train_tokenizer`; default: the synthetic word vocabulary), vae ('synthetic': the
  cached AE pretrained on synthetic renders; 'random'; or the workdir / checkpoint of
  `experiments/own_data/vae.py`, the AE pretrained on your images), checkpoint_every, log_every.
"""
import os

from bagel_jax.models.config import LAYER_VARIANTS
from experiments import common
from experiments.bagel_7b import pretrain

COMMON_ARGS = dict(
    steps=common.Arg(300, min=1), image_size=common.Arg(32, min=8), batch_size=common.Arg(4, min=1),
    seq_len=common.Arg(256, min=32), lr=common.Arg(1e-3, min=0.0), seed=common.Arg(0, min=0),
    variant=common.Arg("mot", choices=LAYER_VARIANTS), ema=common.Arg(0.99, min=0.0), tokenizer="",
    vae="synthetic", vae_steps=common.Arg(0, min=0), checkpoint_every=common.Arg(0, min=0),
    log_every=common.Arg(10, min=1))


def manifests(value: str, what: str):
  """'a.jsonl+b.jsonl' -> ['a.jsonl', 'b.jsonl'] (',' separates config args, so several manifests use '+')."""
  paths = [p for p in value.split("+") if p]
  if not paths:
    raise ValueError(f"config arg {what}=PATH is required (a JSONL manifest; several joined with '+'). Write one "
                     "with: python -m bagel_jax.data.manifest --help")
  for p in paths:
    if not os.path.isfile(p):
      raise ValueError(f"config arg {what}={p!r}: no such file")
  return paths


def source(path: str, name: str, group: str, weight: float = 1.0) -> dict:
  return dict(name=name, type="jsonl", path=os.path.abspath(path), group=group, weight=float(weight))


def own_data_config(name: str, arg, sources, *, gen_und: float = 0.0):
  """Tiny CPU recipe (`common.tiny_cpu`, the pretrain stage's losses) on `sources` (SourceConfig dicts)."""
  if arg.image_size % 8:
    raise ValueError(f"config arg image_size={arg.image_size}: must be a multiple of 8 (the tiny VAE/ViT stride)")
  c = common.base_config()
  c.name = name
  c.seed = arg.seed
  # The PT recipe's schedule and losses (experiments/bagel_7b/pretrain.py) at CPU scale.
  c.stage = "pretrain"
  c.optim.schedule = "constant"
  c.optim.trainable = ".*"
  c.loss.update(dict(ce_weight=0.25, mse_weight=1.0, timestep_shift=1.0))
  c.stage_mix.ratios.update(dict(pretrain.get_config().stage_mix.ratios))
  common.tiny_cpu(c, variant=arg.variant, batch_size=arg.batch_size, seq_len=arg.seq_len,
                  image_size=arg.image_size)
  c.data.source = "pipeline"
  c.data.sources = tuple(sources)
  c.data.gen_und = float(gen_und)
  c.data.update(dict(tokenizer=arg.tokenizer, gen_size=(arg.image_size, arg.image_size),
                     und_size=(arg.image_size, arg.image_size)))
  if arg.vae in ("synthetic", "random"):
    c.init.vae = arg.vae
  else:
    if not os.path.exists(arg.vae):
      raise ValueError(f"config arg vae={arg.vae!r}: not 'synthetic', 'random' or an existing VAE checkpoint path")
    c.init.vae = os.path.abspath(arg.vae)
  c.init.vae_steps = arg.vae_steps
  c.optim.update(dict(lr=arg.lr, warmup_steps=min(50, arg.steps // 10), ema_decay=arg.ema,
                      total_steps=arg.steps))
  c.train.update(dict(steps=arg.steps, log_every=arg.log_every,
                      checkpoint_every=arg.checkpoint_every or max(arg.steps // 4, 1), keep_checkpoints=2))
  return c
