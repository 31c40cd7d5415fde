"""Transformer-design ablation (paper Fig. 3), variant dense. Dense: one set of weights for every token.

  bagel-train --config experiments/ablation/dense.py:size=tiny,seed=0 --workdir workdirs/ablation/dense
  python -m experiments.run --configs experiments/ablation/{dense,moe,mot,moe_topk}.py --seeds 0,1,2
"""
from experiments.ablation import _builder


def get_config(arg=None):
  return _builder.ablation_config("ablation_dense", arg, variant="dense")[0]
