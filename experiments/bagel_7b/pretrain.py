"""BAGEL-7B stage 'pretrain' (paper Table 3, column "Pre-training (PT)").

Every parameter but the frozen VAE learns, on the full multimodal mix.

  bagel-train --config experiments/bagel_7b/pretrain.py:variant=mot,topology=v5p-256 --workdir gs://...
  bagel-train --config experiments/bagel_7b/pretrain.py:runlocal --workdir /tmp/pretrain    # CPU, synthetic data

Every Table 3 value of the stage is below; `_stage.sized` then sizes the recipe for the slice (or for one CPU:
the tiny model on the built-in synthetic data, weighted by the same category ratios). Args: see
experiments/bagel_7b/_stage.py.
"""
from experiments import common
from experiments.bagel_7b import _stage


def get_config(arg=None):
  arg = _stage.parse(arg)
  c = common.base_config()
  c.name = "bagel_7b_pretrain"
  c.stage = "pretrain"
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 2_500
  c.train.steps = c.optim.total_steps = 200_000
  c.optim.trainable = ".*"
  c.optim.ema_decay = 0.9999
  c.loss.ce_weight = 0.25
  c.loss.mse_weight = 1.0
  c.loss.timestep_shift = 1.0
  # data: the sampling ratio of each category (the sources come from --config.data.sources)
  c.stage_mix.ratios.update(dict(
      text=0.05, t2i=0.6, i2t=0.1, interleaved_und=0.1, video=0.1, web=0.05))
  c.data.gen_size = (256, 512)  # generation (VAE) images: (min short edge, max long edge) px
  c.data.und_size = (224, 980)  # understanding (ViT) images
  # Sequence length per rank: 32_768 to 36_864 tokens; rows are packed to the top of that window (the packer
  # fills every capacity of the row, never splitting a sample). Max context window: 16_384 tokens.
  return _stage.sized(c, arg, tokens=36_864)
