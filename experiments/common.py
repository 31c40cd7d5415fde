"""Shared pieces of the experiment configs: typed `parse_arg`, the base config, the paper's stage recipes.

Every experiment file defines `get_config(arg)` (big_vision style) and is used as
`bagel-train --config experiments/bagel_7b/pretrain.py:variant=mot,topology=v5p-256 --workdir DIR`, any field
overridable with `--config.optim.lr=3e-4`. Stage differences are data (Table 3 below), not code.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import ml_collections

from bagel_jax.parallel import topology as topology_lib

# Paper Table 3 (reference §6.5): the four BAGEL stages.
STAGES: Dict[str, Dict[str, Any]] = {
    "align": dict(lr=1e-3, schedule="cosine", warmup_steps=250, steps=5_000, ce_weight=1.0, mse_weight=0.0,
                  ema_decay=0.0, seq_len=(32_768, 36_864), max_context=16_384, gen_res=None, und_res=(378, 378),
                  timestep_shift=1.0, trainable="connector/.*",
                  ratios=dict(text=0.0, t2i=0.0, i2t=1.0, interleaved_und=0.0, video=0.0, web=0.0)),
    "pretrain": dict(lr=1e-4, schedule="constant", warmup_steps=2_500, steps=200_000, ce_weight=0.25,
                     mse_weight=1.0, ema_decay=0.9999, seq_len=(32_768, 36_864), max_context=16_384,
                     gen_res=(256, 512), und_res=(224, 980), timestep_shift=1.0, trainable=".*",
                     ratios=dict(text=0.05, t2i=0.6, i2t=0.1, interleaved_und=0.1, video=0.1, web=0.05)),
    "continued": dict(lr=1e-4, schedule="constant", warmup_steps=2_500, steps=100_000, ce_weight=0.25,
                      mse_weight=1.0, ema_decay=0.9999, seq_len=(40_960, 46_080), max_context=40_960,
                      gen_res=(512, 1024), und_res=(378, 980), timestep_shift=4.0, trainable=".*",
                      ratios=dict(text=0.05, t2i=0.4, i2t=0.1, interleaved_und=0.15, video=0.15, web=0.15)),
    "sft": dict(lr=2.5e-5, schedule="constant", warmup_steps=500, steps=15_000, ce_weight=0.25, mse_weight=1.0,
                ema_decay=0.995, seq_len=(40_960, 46_080), max_context=40_960, gen_res=(512, 1024),
                und_res=(378, 980), timestep_shift=4.0, trainable=".*",
                ratios=dict(text=0.05, t2i=0.3, i2t=0.05, interleaved_und=0.2, video=0.2, web=0.2)),
}

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


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "bagel"
  c.stage = "pretrain"
  c.seed = 0
  c.topology = ""  # TPU slice the config is sized for (AOT and launch scripts); "" = whatever devices exist
  c.model = ml_collections.ConfigDict(dict(
      preset="tiny", variant="mot", dtype="float32", param_dtype="float32", attention_impl="auto",
      remat_policy="none", scan_layers=True, scan_unroll=1, routing="capacity", ce_chunk_size=0, freeze_und=False,
      copy_init_moe=True, max_latent_size=0, vit_layers=0,
      llm_overrides=ml_collections.ConfigDict()))  # e.g. {num_layers: 2}: AOT extrapolation, small ablations
  # init.vae: "random" (real runs load the FLUX AE via `init.checkpoint`) or "synthetic" (the tiny AE pretrained
  # on synthetic renders, bagel_jax.train.vae_pretrain, cached); vae_steps: its pretraining steps (0: default).
  c.init = ml_collections.ConfigDict(dict(checkpoint="", item="params", vae="random", vae_steps=0))
  c.batch = ml_collections.ConfigDict(dict(
      batch_size=8, seq_len=512, vit_capacity=128, latent_capacity=256, image_capacity=16, und_capacity=0,
      ce_capacity=0, vae_image_capacity=0, vae_image_size=0))
  # data.sources: a tuple (not a list) so `--config.data.sources=...` can override it from the command line
  c.data = ml_collections.ConfigDict(dict(source="random", seed=0, sources=()))
  # The stage's data-kind ratios and image edges in px (Table 3; `apply_stage` writes them): what the AOT tool's
  # representative rows are drawn from (bagel_jax/aot/rows.py). The training data itself is `data`.
  c.stage_mix = ml_collections.ConfigDict(dict(ratios=ml_collections.ConfigDict(
      dict(text=0.0, t2i=0.0, i2t=0.0, interleaved_und=0.0, video=0.0, web=0.0)), gen_res=(0, 0), und_res=(0, 0)))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, schedule="constant", warmup_steps=0, min_lr=1e-7, total_steps=1000, b1=0.9, b2=0.95, eps=1e-15,
      weight_decay=0.0, clip_norm=1.0, grad_accum=1, trainable=".*", frozen="vae/.*", ema_decay=0.0))
  c.loss = ml_collections.ConfigDict(dict(ce_weight=0.25, mse_weight=1.0, timestep_shift=1.0))
  c.mesh = ml_collections.ConfigDict(dict(
      ici=ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),
      dcn=ml_collections.ConfigDict(dict(data=1)), rules="default"))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=10, checkpoint_every=500, keep_checkpoints=3, keep_period=0, async_checkpoint=True,
      validate_batches=False, tensorboard=True, plot_every=0, sample_every=0, num_samples=8,
      # fault injection (drills, benchmarks/faults.py): SIGKILL after this step once saves landed; SIGKILL right
      # after this step's async save started; NaN params after this step (a transient blow-up)
      debug_kill_at_step=0, debug_kill_in_save_at_step=0, debug_nan_at_step=0))
  c.distributed = ml_collections.ConfigDict(dict(initialize=False, coordinator="", num_processes=0,
                                                 process_id=-1, cpu_collectives="gloo"))
  return c


def apply_stage(c: ml_collections.ConfigDict, stage: str, *, steps=None) -> ml_collections.ConfigDict:
  """Writes a Table-3 stage recipe into the optimizer/loss fields of `c`."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
  s = STAGES[stage]
  c.stage = stage
  c.optim.lr = s["lr"]
  c.optim.schedule = s["schedule"]
  c.optim.warmup_steps = s["warmup_steps"]
  c.optim.ema_decay = s["ema_decay"]
  c.optim.trainable = s["trainable"]
  c.loss.ce_weight = s["ce_weight"]
  c.loss.mse_weight = s["mse_weight"]
  c.loss.timestep_shift = s["timestep_shift"]
  c.stage_mix.ratios.update(s["ratios"])
  c.stage_mix.gen_res, c.stage_mix.und_res = s["gen_res"] or (0, 0), s["und_res"] or (0, 0)
  c.train.steps = steps or s["steps"]
  c.optim.total_steps = c.train.steps
  return c


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
  step). `ratios`: a Table 3 stage's category ratios (the synthetic tasks reweighted to them); otherwise the
  synthetic mix at gen:und = `gen_und` (the ablations' 4:1)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from bagel_jax.data import config as data_config  # pylint: disable=import-outside-toplevel
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
  if ratios is not None:
    dc = data_config.synthetic_stage_mixture(ratios, image_size=image_size)
  else:
    dc = data_config.synthetic_mixture(gen_und=gen_und, image_size=image_size)
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", seed=int(c.seed), gen_und=dc.gen_und, image_size=image_size,
      sources=tuple(dataclasses.asdict(s) for s in dc.sources)))
  c.init.vae = "synthetic"  # a frozen random VAE decodes every generation to noise
  c.train.update(dict(log_every=10, tensorboard=False))
  return c


def seven_b_batch(c: ml_collections.ConfigDict, stage: str, tokens: int = 0) -> ml_collections.ConfigDict:
  """Per-row capacities for the 7B recipe at `tokens` per row (default: the top of the stage's packing window).

  NU + NL = 1.11 L: MoT layers cost 1.11x a dense pass over the row; the packer enforces both."""
  seq = tokens or STAGES[stage]["seq_len"][1]
  if seq % 512:
    raise ValueError(f"tokens={seq}: a row must be a multiple of the attention kernel's 512-token tile")
  c.batch.seq_len = seq
  c.batch.latent_capacity = seq * 2 // 3
  c.batch.und_capacity = seq - c.batch.latent_capacity + seq // 9
  c.batch.vit_capacity = seq // 4
  c.batch.ce_capacity = seq // 4
  c.batch.image_capacity = 128
  return c
