"""BAGEL-7B stage 'align' (paper Table 3).

  bagel-train --config experiments/bagel_7b/align.py:variant=mot,topology=v5p-256 --workdir gs://...
  bagel-train --config experiments/bagel_7b/align.py:runlocal --workdir /tmp/align    # CPU, synthetic data
"""
from experiments.bagel_7b._stage import stage_config


def get_config(arg=None):
  return stage_config("align", arg)
