"""Text-to-image on your own captioned images, the tiny model on CPU.

  python -m bagel_jax.data.manifest captions --images data/images --captions data/captions.tsv --out data/t2i.jsonl
  bagel-train --config experiments/own_data/t2i.py:manifest=data/t2i.jsonl,steps=300 --workdir workdirs/mine

Args: manifest (required; several joined with '+'), weights (one per manifest, '+'-joined, default equal) and
the common own-data args of `experiments/own_data/_builder.py` (steps, image_size, tokenizer, vae, ...).
Every source's records may be of any kind (docs/data.md); this recipe is meant for t2i records.
"""
from experiments import common
from experiments.own_data import _builder


def get_config(arg=None):
  arg = common.parse_arg(arg, manifest="", weights="", **_builder.COMMON_ARGS)
  paths = _builder.manifests(arg.manifest, "manifest")
  weights = [float(w) for w in arg.weights.split("+")] if arg.weights else [1.0] * len(paths)
  if len(weights) != len(paths):
    raise ValueError(f"config arg weights={arg.weights!r}: {len(weights)} weights for {len(paths)} manifests")
  sources = [_builder.source(p, f"t2i{i}" if len(paths) > 1 else "t2i", "gen", w)
             for i, (p, w) in enumerate(zip(paths, weights))]
  return _builder.own_data_config("own_data_t2i", arg, sources)
