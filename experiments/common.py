"""Shared mechanics of the experiment configs (no recipe values: those are spelled out in each recipe file).

Every experiment file defines `get_config(arg)` (big_vision style) and is used as
`bagel-train --config experiments/bagel_7b/pretrain.py:variant=mot,topology=v5p-256 --workdir DIR`, any field
overridable with `--config.optim.lr=3e-4`. Here: the typed `parse_arg`, sizing a config for a TPU slice
(`size_for_topology`, `fsdp_ici`, `seven_b_batch`) and for one CPU (`tiny_cpu`).
"""
from __future__ import annotations

import math

import ml_collections

from bagel_jax.parallel import topology as topology_lib
from bagel_jax.train.config import base_config  # noqa: F401  (the schema every recipe starts from)


class Arg:
  """A checked config arg for `parse_arg`: `Arg(default, choices=(...))` or `Arg(default, min=1)`.

  The default is returned as is (it may mean "the recipe's value", e.g. steps=0); a value the user writes must
  be one of `choices` / at least `min`, else `parse_arg` raises naming the arg."""

  def __init__(self, default, *, choices=None, min=None):  # pylint: disable=redefined-builtin
    self.default, self.choices, self.min = default, tuple(choices) if choices is not None else None, min


def parse_arg(arg, **spec):
  """'a=1,b=x,flag' -> ConfigDict typed by the defaults in `spec`; bare names set bools to True.

  Unknown names, values that do not parse as the default's type, and values an `Arg` spec rejects (not one of
  its choices, below its minimum) raise ValueError naming the key."""
  checks = {k: v for k, v in spec.items() if isinstance(v, Arg)}
  spec = {k: (v.default if isinstance(v, Arg) else v) for k, v in spec.items()}
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ValueError(f"config arg: unknown key {key!r}; known keys: {sorted(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      if not eq:
        out[key] = True
      elif value.lower() in ("true", "1", "yes"):
        out[key] = True
      elif value.lower() in ("false", "0", "no"):
        out[key] = False
      else:
        raise ValueError(f"config arg {key}={value!r}: expected a bool")
    elif not eq:
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config arg {key}={value!r}: expected {type(default).__name__}") from e
    check = checks.get(key)
    if check is not None and check.choices is not None and out[key] not in check.choices:
      raise ValueError(f"config arg {key}={value!r}: not one of {list(check.choices)}")
    if check is not None and check.min is not None and out[key] < check.min:
      raise ValueError(f"config arg {key}={value}: must be >= {check.min} (leave {key} out for the recipe's "
                       "default)")
  return out


def size_for_topology(c: ml_collections.ConfigDict, topology: str, *, rows_per_chip: int = 1):
  """One packed row per chip (the paper packs one sequence per rank)."""
  c.batch.batch_size = topology_lib.chip_count(topology) * rows_per_chip  # raises on an unknown name
  c.topology = topology
  return c


def fsdp_ici(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """FSDP over the largest group of the slice's chips that divides every width the rules shard (`embed`: the
  LLM's hidden size, `vit_embed`: SigLIP's); the rest of the slice is data parallel.

  7B on v6e-256: gcd(3,584, 1,152) = 128, so fsdp 128 x data 2. FSDP over all 256 chips cannot split 1,152
  and would leave the ViT with its Adam and EMA copies on every chip (7.6 instead of ~1.9 GiB of arguments per
  chip, the first v6e compile in docs/tpu_aot.md)."""
  from bagel_jax.models import config as model_config  # pylint: disable=import-outside-toplevel
  chips = topology_lib.chip_count(c.topology)
  m = model_config.get_preset(c.model.preset, c.model.variant)
  group = math.gcd(chips, math.gcd(m.llm.hidden_size, m.vit.hidden_size))
  c.mesh.ici.update(dict(data=chips // group, fsdp=group, tensor=1))
  return c


def tiny_cpu(c: ml_collections.ConfigDict, *, variant: str = "mot", ratios=None, gen_und: float = 4.0,
             batch_size: int = 4, seq_len: int = 512, image_size: int = 32) -> ml_collections.ConfigDict:
  """The CPU scale of a recipe: tiny preset on the built-in synthetic data in pixel mode (the VAE runs in the
  step). `ratios`: a Table 3 stage's category ratios (the synthetic tasks reweighted to them, no gen:und
  rescaling); otherwise the synthetic mix at gen:und = `gen_und` (the ablations' 4:1)."""
  c.model.preset = "tiny"
  c.model.variant = variant
  c.model.dtype = c.model.param_dtype = "float32"
  c.model.attention_impl = "auto"  # tiled on CPU: only the non-empty tiles of the mask
  c.model.remat_policy = "none"
  c.model.scan_unroll = 64  # the whole layer stack as one straight-line program: faster on CPU
  lat = (image_size // 8) ** 2  # tiny VAE and ViT: 8 px per token
  c.batch.update(dict(batch_size=batch_size, seq_len=seq_len, vit_capacity=seq_len // 4,
                      latent_capacity=seq_len // 2, image_capacity=max(4, seq_len // (2 * lat)),
                      und_capacity=0, ce_capacity=0, vae_image_capacity=max(4, seq_len // (2 * lat)),
                      vae_image_size=image_size))
  # sources=(): the built-in synthetic tasks (weighted by `ratios` when given); --config.data.sources=...
  # replaces them. gen_size/und_size: the pipeline's resize bounds for the 32-px renders.
  data = dict(source="synthetic", seed=int(c.seed), gen_und=0.0 if ratios is not None else float(gen_und),
              image_size=image_size, gen_size=(32, 32), und_size=(32, 64), sources=())
  if ratios is not None:
    data["ratios"] = ml_collections.ConfigDict(dict(ratios))
  c.data = ml_collections.ConfigDict(data)
  c.init.vae = "synthetic"  # a frozen random VAE decodes every generation to noise
  c.train.update(dict(log_every=10, tensorboard=False))
  return c


def seven_b_batch(c: ml_collections.ConfigDict, tokens: int) -> ml_collections.ConfigDict:
  """Per-row capacities for the 7B recipe at `tokens` per row.

  NU + NL = 1.11 L: MoT layers cost 1.11x a dense pass over the row; the packer enforces both."""
  seq = tokens
  if seq % 512:
    raise ValueError(f"tokens={seq}: a row must be a multiple of the attention kernel's 512-token tile")
  c.batch.seq_len = seq
  c.batch.latent_capacity = seq * 2 // 3
  c.batch.und_capacity = seq - c.batch.latent_capacity + seq // 9
  c.batch.vit_capacity = seq // 4
  c.batch.ce_capacity = seq // 4
  c.batch.image_capacity = 128
  return c


BAGEL_7B_STAGES = ("align", "pretrain", "continued", "sft")
