"""The experiment config: its schema, and the one place it becomes typed objects.

`base_config()` is the schema: every key of an experiment config with its default. Experiment files
(experiments/, big_vision style `get_config(arg)`) start from it and set their recipe's values; `bagel-train`
loads them with `config_flags` and locks them, and `check_schema` holds a config built any other way to the
same keys and types.

`resolve(config, n_devices, process_count)` validates a config and returns a `RunConfig`: the `BagelConfig`,
the global `BatchSpec` (`BatchSpec.for_model`) and the `DataConfig`. The trainer calls it once; everything
below (data/, models/, the step) takes only those typed objects, never the ConfigDict.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

from bagel_jax import batch as batch_lib
from bagel_jax.data import scan
from bagel_jax.data.config import DataConfig
from bagel_jax.models import config as config_lib
from bagel_jax.parallel import mesh as mesh_lib
from bagel_jax.parallel import rules as rules_lib

DATA_SOURCES = ("random", "synthetic", "pipeline")  # config.data.source: the trainer's input selector
VAE_INITS = ("random", "synthetic")


def base_config() -> ml_collections.ConfigDict:
  """Every key of an experiment config and its default (a recipe file overrides what its recipe sets)."""
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
  # init.vae: "random" (real runs load the FLUX AE via `init.checkpoint`), "synthetic" (the tiny AE of
  # experiments/tiny/vae.py, pretrained on synthetic renders and cached) or a VAE checkpoint path; vae_steps:
  # the synthetic AE's pretraining steps (0: the default).
  c.init = ml_collections.ConfigDict(dict(checkpoint="", item="params", vae="random", vae_steps=0))
  c.batch = ml_collections.ConfigDict(dict(
      batch_size=8, seq_len=512, vit_capacity=128, latent_capacity=256, image_capacity=16, und_capacity=0,
      ce_capacity=0, vae_image_capacity=0, vae_image_size=0))
  # data.sources: a tuple (not a list) so `--config.data.sources=...` can override it from the command line
  c.data = ml_collections.ConfigDict(dict(source="random", seed=0, sources=()))
  # The stage's data-kind ratios (Table 3, set by the recipe): what the AOT tool's representative rows are drawn
  # from, and what the tiny recipes weight the built-in synthetic tasks by. The training data itself is `data`.
  c.stage_mix = ml_collections.ConfigDict(dict(ratios=ml_collections.ConfigDict(
      dict(text=0.0, t2i=0.0, i2t=0.0, interleaved_und=0.0, video=0.0, web=0.0))))
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


def load_config(path_and_arg: str, overrides=()) -> ml_collections.ConfigDict:
  """An experiment file `path[:arg]` with `--config.KEY=VALUE` overrides, loaded and locked by `config_flags`
  exactly as `bagel-train --config` loads it (the one loader of every tool that takes an experiment file)."""
  argv = ["load_config", f"--config={path_and_arg}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def check_schema(config, reference=None, prefix: str = "config") -> None:
  """Unknown keys and wrong types against `base_config()` (what `lock_config` enforces on the CLI)."""
  reference = base_config() if reference is None else reference
  for key in config.keys():
    name = f"{prefix}.{key}"
    if key not in reference:
      raise ValueError(f"{name}: unknown config key (known: {sorted(reference.keys())})")
    got, want = config[key], reference[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(got, (ml_collections.ConfigDict, dict)):
        raise ValueError(f"{name}: expected a config dict, got {type(got).__name__}")
      if prefix == "config" and key in ("data",):
        continue  # the data config is owned by the data source (DataConfig.from_config checks it)
      if key in ("ici", "dcn", "llm_overrides"):
        continue  # free-form maps, checked where used
      check_schema(got, want, name)
    elif want is not None and not isinstance(got, type(want)) and not (
        isinstance(want, float) and isinstance(got, int) and not isinstance(got, bool)):
      raise ValueError(f"{name}={got!r}: expected {type(want).__name__}, got {type(got).__name__}")


# ----------------------------------------------------------------------------------------------------------
# ConfigDict -> typed objects.
# ----------------------------------------------------------------------------------------------------------

def model_config(config) -> config_lib.BagelConfig:
  """`config.model` -> the BagelConfig (a preset with the config's implementation knobs and overrides)."""
  m = config.model
  kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=m.attention_impl,
            remat_policy=m.remat_policy, scan_layers=m.scan_layers, routing=m.routing,
            ce_chunk_size=m.ce_chunk_size, freeze_und=m.freeze_und, scan_unroll=m.get("scan_unroll", 1))
  cfg = config_lib.get_preset(m.preset, m.variant, **kw)
  if m.get("max_latent_size", 0):
    cfg = cfg.replace(max_latent_size=int(m.max_latent_size))
  for key, value in dict(m.get("llm_overrides", {}) or {}).items():
    cfg = cfg.replace_llm(**{key: value})
  if m.get("vit_layers", 0):
    cfg = cfg.replace(vit=dataclasses.replace(cfg.vit, num_layers=int(m.vit_layers)))
  return cfg


def batch_spec(config, model_cfg: config_lib.BagelConfig, batch_size: Optional[int] = None) -> batch_lib.BatchSpec:
  """`config.batch` -> the global BatchSpec of `model_cfg` (`batch_size` overrides the rows, e.g. 1)."""
  b = config.batch
  try:
    return batch_lib.BatchSpec.for_model(
        model_cfg, batch_size=int(batch_size or b.batch_size), seq_len=int(b.seq_len),
        vit_capacity=int(b.vit_capacity), latent_capacity=int(b.latent_capacity),
        image_capacity=int(b.image_capacity), und_capacity=int(b.und_capacity) or None,
        ce_capacity=int(b.ce_capacity) or None, vae_image_capacity=int(b.vae_image_capacity),
        vae_image_size=int(b.vae_image_size))
  except ValueError as e:
    raise ValueError(f"config.batch: {e}".replace("BatchSpec.", "config.batch.")) from e


def data_config(config) -> Optional[DataConfig]:
  """`config.data` -> DataConfig (`source: synthetic` with no `sources` = the default synthetic mixture);
  `config.data.seed` (else `config.seed`) seeds it. None for `source: random` (no data pipeline)."""
  d = config.data
  if d.get("source", "random") == "random":
    return None
  dc = DataConfig.from_config(d)
  if "seed" not in d and "seed" in config:
    dc = dc.replace(seed=int(config.seed))
  return dc


def random_requirements(model_cfg: config_lib.BagelConfig) -> Dict[str, int]:
  """Per-row resources of the largest sample of the random input (`data.examples.random_sample`): <= 11 text
  tokens x 2 items, images up to 4x4 tokens."""
  lat = min(4, model_cfg.max_latent_size) ** 2
  vit = min(4, model_cfg.vit.max_patches_per_side) ** 2
  return dict(tokens=2 * lat + vit + 5 * 2 + 16, vit_tokens=vit, latent_tokens=4 * lat, images=6)


def vae_image_size(config) -> int:
  """The resolution the synthetic VAE stand-in is pretrained at (0: unknown)."""
  return int(config.batch.vae_image_size) or int(config.data.get("image_size", 0) or 0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The typed view of an experiment config: what the trainer hands the layers below it."""
  model: config_lib.BagelConfig
  spec: batch_lib.BatchSpec          # the global batch
  source: str                        # config.data.source: "random" batches, or the "synthetic"/"pipeline" data
  data: Optional[DataConfig]         # the pipeline's sources (None for random batches, or when not resolved)
  data_seed: int                     # seeds the random input (and `data.seed` the pipeline)
  vae_image_size: int                # resolution of the synthetic VAE stand-in (init.vae="synthetic")

  def local_spec(self, process_count: int) -> batch_lib.BatchSpec:
    """This process's rows of the global batch."""
    return dataclasses.replace(self.spec, batch_size=self.spec.batch_size // process_count)


def resolve(config, n_devices: int, process_count: int = 1, with_data: bool = True) -> RunConfig:
  """Checks `config` (schema, optimizer, loss, mesh, batch divisibility, VAE init) and returns its typed view.
  Data sources are opened by the input pipeline, once, which checks the records against the batch then.
  `with_data=False` (AOT compiles: shapes only) leaves `data` unresolved."""
  check_schema(config)
  o = config.optim
  if o.grad_accum < 1:
    raise ValueError(f"config.optim.grad_accum={o.grad_accum} must be >= 1")
  if o.lr < 0 or o.warmup_steps < 0:
    raise ValueError("config.optim.lr and config.optim.warmup_steps must be >= 0")
  if not 0.0 <= o.ema_decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={o.ema_decay} must be in [0, 1) (0 disables EMA)")
  if o.schedule not in ("constant", "cosine"):
    raise ValueError(f"config.optim.schedule={o.schedule!r} is not 'constant' or 'cosine'")
  if config.loss.ce_weight < 0 or config.loss.mse_weight < 0 or config.loss.timestep_shift <= 0:
    raise ValueError("config.loss: weights must be >= 0 and timestep_shift > 0")
  if config.train.steps < 1 or config.train.log_every < 1 or config.train.checkpoint_every < 1:
    raise ValueError("config.train.steps, log_every and checkpoint_every must be >= 1")
  if config.init.vae not in VAE_INITS and not os.path.exists(config.init.vae):
    raise ValueError(f"config.init.vae={config.init.vae!r} is not one of {VAE_INITS} or an existing VAE checkpoint "
                     "path (experiments/own_data/vae.py workdir, bagel-convert flux-ae output, .npz)")
  if config.init.vae_steps < 0:
    raise ValueError(f"config.init.vae_steps={config.init.vae_steps} must be >= 0 (0: the default)")
  if config.init.vae == "synthetic" and not vae_image_size(config):
    raise ValueError("config.init.vae='synthetic' needs config.batch.vae_image_size or config.data.image_size "
                     "(the resolution the VAE is pretrained at)")
  if config.data.source not in DATA_SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r} is not one of {DATA_SOURCES}")
  ici = dict(config.mesh.ici)
  dcn = dict(config.mesh.dcn)
  n_slices = int(dcn.get("data", 1))
  if n_devices % n_slices:
    raise ValueError(f"config.mesh.dcn.data={n_slices} does not divide the {n_devices} devices")
  sizes = mesh_lib.resolve_axes(ici, n_devices // n_slices, "ici")
  rules_lib.get_rules(config.mesh.rules)
  batch_axes = n_slices * sizes["data"] * sizes["fsdp"]
  b = int(config.batch.batch_size)
  if b % (batch_axes * o.grad_accum) or b % process_count:
    raise ValueError(f"config.batch.batch_size={b} must be divisible by the batch mesh axes ({batch_axes}) x "
                     f"config.optim.grad_accum ({o.grad_accum}) and by the process count ({process_count})")
  model_cfg = model_config(config)
  spec = batch_spec(config, model_cfg)
  if config.data.source == "random":  # no sources to open: the largest random sample is known from the model
    scan.check_capacities(random_requirements(model_cfg), spec)
  return RunConfig(model=model_cfg, spec=spec, source=str(config.data.source),
                   data=data_config(config) if with_data else None,
                   data_seed=int(config.data.get("seed", config.get("seed", 0))),
                   vae_image_size=vae_image_size(config))
