"""Transformer-design ablation (paper Fig. 3), variant moe. MoE: only the FFN is duplicated into a hard-routed generation expert.

  bagel-train --config experiments/ablation/moe.py:size=tiny,seed=0 --workdir workdirs/ablation/moe
  python -m experiments.run --configs experiments/ablation/{dense,moe,mot,moe_topk}.py --seeds 0,1,2
"""
from experiments.ablation import _builder


def get_config(arg=None):
  return _builder.ablation_config("ablation_moe", arg, variant="moe")[0]
