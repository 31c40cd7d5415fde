"""Tiny model on random packed batches: seconds per step on CPU. For tests, benchmarks and drills.

  bagel-train --config experiments/tiny/random_smoke.py:variant=mot,steps=20 --workdir /tmp/smoke
"""
from experiments import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="mot", steps=20, batch=2, seq=128, lr=1e-3, ema=0.99, stage="pretrain")
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
