"""BAGEL-7B stage 'align' (paper Table 3, column "Alignment").

Only the ViT connector learns (everything else frozen), on image-to-text data.

  bagel-train --config experiments/bagel_7b/align.py:variant=mot,topology=v5p-256 --workdir gs://...
  bagel-train --config experiments/bagel_7b/align.py:runlocal --workdir /tmp/align    # CPU, synthetic data

Every Table 3 value of the stage is below; `_stage.sized` then sizes the recipe for the slice (or for one CPU:
the tiny model on the built-in synthetic data, weighted by the same category ratios). Args: see
experiments/bagel_7b/_stage.py.
"""
from experiments import common
from experiments.bagel_7b import _stage


def get_config(arg=None):
  arg = _stage.parse(arg)
  c = common.base_config()
  c.name = "bagel_7b_align"
  c.stage = "align"
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 250
  c.train.steps = c.optim.total_steps = 5_000
  c.optim.trainable = "connector/.*"
  c.optim.ema_decay = 0.0
  c.loss.ce_weight = 1.0
  c.loss.mse_weight = 0.0
  c.loss.timestep_shift = 1.0
  # data: the sampling ratio of each category (the sources come from --config.data.sources)
  c.stage_mix.ratios.update(dict(
      text=0.0, t2i=0.0, i2t=1.0, interleaved_und=0.0, video=0.0, web=0.0))
  # no generation images: MSE weight 0 and no t2i/video/web data
  c.data.und_size = (378, 378)  # understanding (ViT) images
  # Sequence length per rank: 32_768 to 36_864 tokens; rows are packed to the top of that window (the packer
  # fills every capacity of the row, never splitting a sample). Max context window: 16_384 tokens.
  return _stage.sized(c, arg, tokens=36_864)
