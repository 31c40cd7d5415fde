"""Transformer-design ablation (paper Fig. 3), variant moe_topk. moe_topk: a learned top-1 router over two FFN experts (token choice, capacity-limited).

  bagel-train --config experiments/ablation/moe_topk.py:size=tiny,seed=0 --workdir workdirs/ablation/moe_topk
  python -m experiments.run --configs experiments/ablation/{dense,moe,mot,moe_topk}.py --seeds 0,1,2
"""
from experiments.ablation import _builder


def get_config(arg=None):
  return _builder.ablation_config("ablation_moe_topk", arg, variant="moe_topk")[0]
