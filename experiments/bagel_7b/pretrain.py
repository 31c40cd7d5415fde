"""BAGEL-7B stage 'pretrain' (paper Table 3).

  bagel-train --config experiments/bagel_7b/pretrain.py:variant=mot,topology=v5p-256 --workdir gs://...
  bagel-train --config experiments/bagel_7b/pretrain.py:runlocal --workdir /tmp/pretrain    # CPU, synthetic data
"""
from experiments.bagel_7b._stage import stage_config


def get_config(arg=None):
  return stage_config("pretrain", arg)
