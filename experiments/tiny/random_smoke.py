"""Tiny model on random packed batches: seconds per step on CPU. For tests, benchmarks and drills.

  bagel-train --config experiments/tiny/random_smoke.py:variant=mot,steps=20 --workdir /tmp/smoke
"""
import importlib

from bagel_jax.models.config import LAYER_VARIANTS
from experiments import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant=common.Arg("mot", choices=LAYER_VARIANTS), steps=common.Arg(20, min=1),
                         batch=common.Arg(2, min=1), seq=common.Arg(128, min=16), lr=common.Arg(1e-3, min=0.0),
                         ema=common.Arg(0.99, min=0.0), stage=common.Arg("pretrain", choices=common.BAGEL_7B_STAGES),
                         layers=common.Arg(0, min=0))
  c = common.base_config()
  c.name = "tiny_random_smoke"
  # The stage recipe's schedule, trainable set and losses (experiments/bagel_7b/<stage>.py) at these steps.
  recipe = importlib.import_module(f"experiments.bagel_7b.{arg.stage}").get_config()
  c.stage = recipe.stage
  c.optim.update(dict(schedule=recipe.optim.schedule, trainable=recipe.optim.trainable))
  c.loss.update(recipe.loss.to_dict())
  c.stage_mix.ratios.update(dict(recipe.stage_mix.ratios))
  c.train.steps = c.optim.total_steps = arg.steps
  c.model.preset = "tiny"
  c.model.variant = arg.variant
  if arg.layers:  # LLM depth other than the preset's (e.g. where per-layer activations must dominate memory)
    c.model.llm_overrides = dict(num_layers=arg.layers)
  c.optim.update(dict(lr=arg.lr, warmup_steps=0, ema_decay=arg.ema if arg.stage != "align" else 0.0))
  c.batch.update(dict(batch_size=arg.batch, seq_len=arg.seq, vit_capacity=32, latent_capacity=64, image_capacity=8))
  c.train.update(dict(log_every=1, checkpoint_every=10, tensorboard=False))
  c.data.source = "random"
  return c
