"""Text-to-image plus visual question answering on your own data: the paper's gen/und mix at CPU scale.

  python -m bagel_jax.data.manifest classes --root data/classes --out data/t2i.jsonl --vqa-out data/vqa.jsonl
  bagel-train --config experiments/own_data/t2i_vqa.py:t2i=data/t2i.jsonl,vqa=data/vqa.jsonl,steps=300 \
      --workdir workdirs/mine_mix

Args: t2i and vqa (required manifests; several joined with '+'), gen_und (total weight of the t2i sources :
total weight of the vqa sources, 4 as in the paper's ablations) and the common own-data args of
`experiments/own_data/_builder.py`.
"""
from experiments import common
from experiments.own_data import _builder


def get_config(arg=None):
  arg = common.parse_arg(arg, t2i="", vqa="", gen_und=common.Arg(4.0, min=1e-6), **_builder.COMMON_ARGS)
  sources = []
  for what, group in (("t2i", "gen"), ("vqa", "und")):
    paths = _builder.manifests(arg[what], what)
    sources += [_builder.source(p, f"{what}{i}" if len(paths) > 1 else what, group) for i, p in enumerate(paths)]
  return _builder.own_data_config("own_data_t2i_vqa", arg, sources, gen_und=arg.gen_und)
