"""BAGEL-7B stage 'continued' (paper Table 3, column "Continued training (CT)").

Higher resolution and longer rows; more interleaved data.

  bagel-train --config experiments/bagel_7b/continued.py:variant=mot,topology=v5p-256 --workdir gs://...
  bagel-train --config experiments/bagel_7b/continued.py:runlocal --workdir /tmp/continued    # CPU, synthetic data

Every Table 3 value of the stage is below; `_stage.sized` then sizes the recipe for the slice (or for one CPU:
the tiny model on the built-in synthetic data, weighted by the same category ratios). Args: see
experiments/bagel_7b/_stage.py.
"""
from experiments import common
from experiments.bagel_7b import _stage


def get_config(arg=None):
  arg = _stage.parse(arg)
  c = common.base_config()
  c.name = "bagel_7b_continued"
  c.stage = "continued"
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 2_500
  c.train.steps = c.optim.total_steps = 100_000
  c.optim.trainable = ".*"
  c.optim.ema_decay = 0.9999
  c.loss.ce_weight = 0.25
  c.loss.mse_weight = 1.0
  c.loss.timestep_shift = 4.0
  # data: the sampling ratio of each category (the sources come from --config.data.sources)
  c.stage_mix.ratios.update(dict(
      text=0.05, t2i=0.4, i2t=0.1, interleaved_und=0.15, video=0.15, web=0.15))
  c.data.gen_size = (512, 1024)  # generation (VAE) images: (min short edge, max long edge) px
  c.data.und_size = (378, 980)  # understanding (ViT) images
  # Sequence length per rank: 40_960 to 46_080 tokens; rows are packed to the top of that window (the packer
  # fills every capacity of the row, never splitting a sample). Max context window: 40_960 tokens.
  return _stage.sized(c, arg, tokens=46_080)
