"""Tiny model on random packed batches: seconds per step on CPU. For tests, benchmarks and drills.

  bagel-train --config experiments/tiny/random_smoke.py:variant=mot,steps=20 --workdir /tmp/smoke
"""
from bagel_jax.models.config import LAYER_VARIANTS
from experiments import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant=common.Arg("mot", choices=LAYER_VARIANTS), steps=common.Arg(20, min=1),
                         batch=common.Arg(2, min=1), seq=common.Arg(128, min=16), lr=common.Arg(1e-3, min=0.0),
                         ema=common.Arg(0.99, min=0.0), stage=common.Arg("pretrain", choices=common.STAGES))
  c = common.base_config()
  c.name = "tiny_random_smoke"
  common.apply_stage(c, arg.stage, steps=arg.steps)
  c.model.preset = "tiny"
  c.model.variant = arg.variant
  c.optim.update(dict(lr=arg.lr, warmup_steps=0, ema_decay=arg.ema if arg.stage != "align" else 0.0))
  c.batch.update(dict(batch_size=arg.batch, seq_len=arg.seq, vit_capacity=32, latent_capacity=64, image_capacity=8))
  c.train.update(dict(log_every=1, checkpoint_every=10, tensorboard=False))
  c.data.source = "random"
  return c
