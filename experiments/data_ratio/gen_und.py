"""Data-ratio ablation (paper Fig. 5): MoT at gen:und = 1:1 ... 4:1 (1g1u ... 4g1u), 16K steps at 1.5B.

  python -m experiments.run --configs experiments/data_ratio/gen_und.py --grid gen=1,2,3,4 --seeds 0,1,2
"""
from experiments import common
from experiments.ablation import _builder


def get_config(arg=None):
  c, arg = _builder.ablation_config("data_ratio", arg, gen=common.Arg(4, min=1))
  c.data.gen_und = float(arg.gen)
  c.name = f"data_ratio_{arg.gen}g1u"
  if arg.size == "1.5b" and not arg.steps:
    c.train.steps = c.optim.total_steps = 16_000
  return c
