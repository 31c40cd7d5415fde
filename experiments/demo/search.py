"""The demo-size search (issue #20): which model size, task mix and run length make `make demo` draw what it is
asked within its CPU time budget. One config, every knob an arg:

  bagel-train --config experiments/demo/search.py:hidden=128,layers=4,inter=512,single=True,bs=2,steps=4000 \
      --workdir workdirs/demo_search/a1
  bagel-eval --checkpoint workdirs/demo_search/a1 --suites t2i,vqa --num-samples 32

Pre-training (PT) losses at the tiny CPU scale (`common.tiny_cpu`, pretrained tiny VAE) on t2i + vqa (+ text)
only: the two suites the demo is scored on. `single`: the t2i source draws single-object scenes only (what the
T2I single-object score asks for). Results and the table: experiments/results/demo_search/.
"""
import dataclasses

import ml_collections

from bagel_jax.data import config as data_config
from experiments import common
from experiments.common import Arg


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=Arg(2000, min=1), hidden=Arg(64, min=8), layers=Arg(2, min=1),
                         inter=Arg(128, min=8), heads=Arg(4, min=1), kv=Arg(2, min=1), vit_layers=Arg(0, min=0),
                         t2i=1.0, vqa=1.0, text=0.0, single=False, shift=0.0, lr=1e-3, bs=Arg(4, min=1),
                         seq=Arg(512, min=64), seed=0, ema=0.99)
  c = common.base_config()
  c.name = "demo_search"
  c.seed = arg.seed
  c.stage = "pretrain"
  c.optim.trainable = ".*"
  c.loss.update(dict(ce_weight=0.25, mse_weight=1.0, timestep_shift=arg.shift or 1.0))
  common.tiny_cpu(c, variant="mot", batch_size=arg.bs, seq_len=arg.seq)
  weights = {k: v for k, v in dict(t2i=arg.t2i, vqa=arg.vqa, text=arg.text).items() if v > 0}
  if not weights:
    raise ValueError("demo/search.py: t2i, vqa and text weights are all 0; nothing to train on")
  dc = data_config.synthetic_mixture(list(weights), gen_und=0.0, weights=weights)
  sources = [dataclasses.asdict(s) for s in dc.sources]
  for s in sources:
    if arg.single and s["task"] == "t2i":
      s["variants"] = ("single",)
  c.data.sources = tuple(ml_collections.ConfigDict(s) for s in sources)
  c.data.gen_und = 0.0  # the weights above are the mix (no gen:und rescaling)
  c.model.llm_overrides = ml_collections.ConfigDict(
      {} if arg.hidden == 64 else dict(hidden_size=arg.hidden, head_dim=arg.hidden // arg.heads,
                                       num_heads=arg.heads, num_kv_heads=arg.kv))
  if arg.layers != 2:
    c.model.llm_overrides.num_layers = arg.layers
  if arg.inter != 128:
    c.model.llm_overrides.intermediate_size = arg.inter
  c.model.vit_layers = arg.vit_layers
  c.train.steps = c.optim.total_steps = arg.steps
  c.optim.update(dict(warmup_steps=min(100, arg.steps // 10), lr=arg.lr, ema_decay=arg.ema, schedule="cosine"))
  c.train.update(dict(checkpoint_every=max(arg.steps // 4, 50), log_every=50))
  return c
