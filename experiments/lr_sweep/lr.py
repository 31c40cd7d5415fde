"""Learning-rate ablation (paper Fig. 6): MoT at gen:und 1:1 over the paper's 7 learning rates, with the loss
weights CE:MSE = 1:1 (`ce_weight=1.0`, where the LR trade-off shows) or 0.25:1 (the fix, Table 3).

`lr_index` picks one of the paper's LRs (4.3e-5 ... 1.73e-4 at 1.5B); the tiny size scales them by the ratio of
its base LR to the paper's 1e-4, keeping their spread.

  python -m experiments.run --configs experiments/lr_sweep/lr.py --grid lr_index=0,1,2,3,4,5,6 \
      --arg ce_weight=1.0 --seeds 0,1,2
"""
from experiments.ablation import _builder

PAPER_LRS = (4.3e-5, 6.1e-5, 8.6e-5, 1e-4, 1.22e-4, 1.45e-4, 1.73e-4)


def get_config(arg=None):
  c, arg = _builder.ablation_config("lr_sweep", arg, gen_und=1.0, ce_weight=1.0, lr_index=3)
  if not 0 <= arg.lr_index < len(PAPER_LRS):
    raise ValueError(f"config arg lr_index={arg.lr_index}: choose 0..{len(PAPER_LRS) - 1} ({PAPER_LRS})")
  base = _builder.SIZES[arg.size]["lr"]
  c.optim.lr = PAPER_LRS[arg.lr_index] / 1e-4 * base
  c.name = f"lr_sweep_{c.optim.lr:.3g}_ce{arg.ce_weight:g}"
  return c
