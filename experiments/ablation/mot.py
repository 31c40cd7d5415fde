"""Transformer-design ablation (paper Fig. 3), variant mot. MoT: every LLM parameter is duplicated into a hard-routed generation expert (BAGEL).

  bagel-train --config experiments/ablation/mot.py:size=tiny,seed=0 --workdir workdirs/ablation/mot
  python -m experiments.run --configs experiments/ablation/{dense,moe,mot,moe_topk}.py --seeds 0,1,2
"""
from experiments.ablation import _builder


def get_config(arg=None):
  return _builder.ablation_config("ablation_mot", arg, variant="mot")[0]
