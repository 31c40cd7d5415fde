"""The training loop: one function from an experiment config to a trained, checkpointed run.

Order of business (big_vision's train.py layout): validate config -> mesh and rules -> input -> abstract state
and shardings -> sharded init or restore -> jitted step -> loop (metrics, checkpoints, preemption, NaN stop)
-> curves. The step is compiled with explicit in/out shardings (pjit) under `jax.set_mesh` and the logical
axis rules, so the same code runs on one CPU and on a multi-slice pod.

Size (over 400 lines: the loop reads top to bottom in one file, big_vision's train.py style; the typed config
is train/config.py, the input train/inputs.py, checkpoints train/checkpointing.py, metrics train/metrics.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import console
from bagel_jax import batch as batch_lib
from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib
from bagel_jax.models.flux_vae import init_vae_params
from bagel_jax.parallel import mesh as mesh_lib
from bagel_jax.parallel import rules as rules_lib
from bagel_jax.train import checkpointing, flops as flops_lib, inputs, metrics as metrics_lib
from bagel_jax.train import config as train_config
from bagel_jax.train import optimizer as opt_lib
from bagel_jax.train import vae_pretrain
from bagel_jax.train.errors import TrainingFault
from bagel_jax.train.step import TrainState, init_state, make_train_step

log = console.logger(__name__)


class NonFiniteLossError(TrainingFault):
  """The loss or the training state became NaN/Inf; the run stops. Every checkpoint on disk passed the
  finiteness check, so the newest one is the last good one."""




# ----------------------------------------------------------------------------------------------------------
# Shardings and state.
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  config: Any
  run: train_config.RunConfig        # the typed view of `config` (model, global batch spec, data)
  model_cfg: config_lib.BagelConfig
  mesh: Any
  rules: Any
  spec: batch_lib.BatchSpec          # global batch
  local_spec: batch_lib.BatchSpec    # this process's rows
  tx: Any
  schedule: Any
  mask: Any
  param_shardings: Any
  state_shardings: Any
  abstract_state: Any
  step_fn: Any
  finite_fn: Any = None  # state -> scalar bool: params, optimizer state and EMA all finite (on device)
  # Modules kept beside the state, sharded, never passed to the step (the frozen VAE when rows carry latents):
  # {module: shardings}. Checkpoints keep the full trees (`saved_abstract`, `to_saved`, `from_saved`).
  outside_shardings: Any = None
  saved_abstract: Any = None


def to_saved(s: Setup, state: TrainState, outside: Dict[str, Any]) -> TrainState:
  """The checkpoint's view of a state: full params (the modules kept outside put back) and a full EMA tree
  (frozen leaves = their parameters, as inference loads `ema` as a whole model). No copies are made."""
  params = {**state.params, **outside}
  return state.replace(params=params, ema=None if state.ema is None else opt_lib.merge(params, state.ema))


def from_saved(s: Setup, saved: TrainState) -> Tuple[TrainState, Dict[str, Any]]:
  """A restored checkpoint view -> (train state, modules kept outside)."""
  outside = {k: saved.params[k] for k in s.outside_shardings}
  params = {k: v for k, v in saved.params.items() if k not in outside}
  ema = None if saved.ema is None else opt_lib.trained(
      {k: v for k, v in saved.ema.items() if k not in outside}, s.mask)
  return saved.replace(params=params, ema=ema), outside


def _opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh):
  """Optimizer-state leaves mirror parameters (Adam mu/nu): give each the sharding of the parameter whose path
  is the longest suffix of its own path with the same shape; scalars (counts) are replicated."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                              jax.tree.leaves(param_shardings)):
    by_path[tuple(path)] = (leaf.shape, sh)

  def one(path, leaf):
    path = tuple(path)
    for i in range(len(path)):
      hit = by_path.get(path[i:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return rules_lib.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def make_setup(config, devices=None, check_data: bool = True) -> Setup:
  """Everything the loop (or an AOT compile, with `devices` of a TPU topology and `check_data=False`: shapes
  only, the data config left unresolved) needs."""
  devices = list(jax.devices() if devices is None else devices)
  run = train_config.resolve(config, len(devices), jax.process_count(), with_data=check_data)
  model_cfg = run.model
  mesh = mesh_lib.create_mesh(dict(config.mesh.ici), dict(config.mesh.dcn), devices)
  rules = rules_lib.rules_for_mesh(rules_lib.get_rules(config.mesh.rules), mesh)
  spec = run.spec
  local_spec = run.local_spec(jax.process_count())

  full_abstract = bagel_lib.abstract_params(model_cfg)
  logical = bagel_lib.param_logical_axes(model_cfg)
  full_shardings = rules_lib.logical_to_sharding(logical, full_abstract, mesh, rules)
  shortfalls = rules_lib.sharding_shortfalls(logical, full_abstract, mesh, rules)
  if shortfalls:
    log.warning("%d parameter arrays are sharded fewer ways than config.mesh.rules=%r asks (a dimension the mesh "
                "axes do not divide): %.1f MiB more per device, largest %s %s wanted %s got %s",
                len(shortfalls), config.mesh.rules, sum(r[-1] for r in shortfalls) / 2**20, *shortfalls[0][:4])
  outside = () if spec.pixel_mode else ("vae",)  # rows carry latents: the frozen VAE never runs in the step
  abstract_params = {k: v for k, v in full_abstract.items() if k not in outside}
  param_shardings = {k: v for k, v in full_shardings.items() if k not in outside}
  optim = config.optim
  tx, schedule, mask = opt_lib.make_optimizer(optim, abstract_params)
  ema = optim.ema_decay > 0
  abstract_state = jax.eval_shape(lambda p: init_state(p, tx, ema, mask), abstract_params)
  state_shardings = TrainState(
      step=rules_lib.replicated(mesh), params=param_shardings,
      opt_state=_opt_state_shardings(abstract_state.opt_state, abstract_params, param_shardings, mesh),
      ema=opt_lib.trained(param_shardings, mask) if ema else None)
  with_sharding = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  abstract_state = jax.tree.map(with_sharding, abstract_state, state_shardings)
  full_params = jax.tree.map(with_sharding, full_abstract, full_shardings)
  saved_abstract = abstract_state.replace(params=full_params, ema=full_params if ema else None)
  train_step = make_train_step(
      model_cfg, tx=tx, mask=mask, schedule=schedule, seed=int(config.seed),
      timestep_shift=float(config.loss.timestep_shift), ce_weight=float(config.loss.ce_weight),
      mse_weight=float(config.loss.mse_weight), grad_accum=int(optim.grad_accum), ema_decay=float(optim.ema_decay))
  batch_sh = rules_lib.batch_shardings(mesh, spec.abstract())
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                    out_shardings=(state_shardings, rules_lib.replicated(mesh)), donate_argnums=(0,))
  finite_fn = jax.jit(state_is_finite, in_shardings=(state_shardings,), out_shardings=rules_lib.replicated(mesh))
  return Setup(config, run, model_cfg, mesh, rules, spec, local_spec, tx, schedule, mask, param_shardings,
               state_shardings, abstract_state, step_fn, finite_fn,
               outside_shardings={k: full_shardings[k] for k in outside}, saved_abstract=saved_abstract)


def state_is_finite(state: TrainState):
  """True iff every float leaf of params, optimizer state and EMA is finite: one fused reduction per leaf, run
  on the devices holding the shards; only a scalar comes back. Checked before every checkpoint save."""
  leaves = [x for x in jax.tree.leaves((state.params, state.opt_state, state.ema))
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def init_params_sharded(s: Setup, rng) -> Any:
  """The full parameter tree (the modules kept outside the state included) created directly in its shardings
  (no full copy on one device)."""
  rng_model, rng_vae = jax.random.split(rng)
  shardings = s.saved_abstract.params
  shardings = jax.tree.map(lambda a: a.sharding, shardings)
  no_vae = {k: v for k, v in shardings.items() if k != "vae"}
  init = jax.jit(lambda r: nn.unbox(bagel_lib._boxed_init(s.model_cfg, r, with_vae=False))["params"],  # pylint: disable=protected-access
                 out_shardings=no_vae)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    params = init(rng_model)
  params["vae"] = jax.device_put(initial_vae_params(s, rng_vae), shardings["vae"])
  if s.config.model.copy_init_moe and s.model_cfg.llm.num_modality_experts == 2:
    params = jax.jit(lambda p: bagel_lib.init_gen_from_und(p, s.model_cfg), out_shardings=shardings)(params)
  return params


def initial_vae_params(s: Setup, rng) -> Any:
  """The frozen VAE: `init.vae="random"` is a placeholder for converted FLUX weights (`init.checkpoint`);
  "synthetic" is the tiny AE pretrained on synthetic renders (cached; a fixed seed, so every run of a sweep
  shares one VAE, as real runs share FLUX's)."""
  if s.config.init.vae not in train_config.VAE_INITS:  # a path: experiments/own_data/vae.py, bagel-convert flux-ae, .npz
    return vae_pretrain.load_vae(s.config.init.vae, s.model_cfg.vae)
  if s.config.init.vae == "synthetic":  # the cached run of experiments/tiny/vae.py
    return vae_pretrain.cached_pretrained_vae(
        s.model_cfg.vae, s.run.vae_image_size, steps=int(s.config.init.vae_steps) or vae_pretrain.default_steps())
  return init_vae_params(s.model_cfg.vae, rng)


def initial_params(s: Setup) -> Any:
  """From `config.init.checkpoint` (converted weights), else fresh."""
  path = s.config.init.checkpoint
  if path:
    params, _, step = ckpt_lib.load_params(path, s.model_cfg, abstract=s.saved_abstract.params,
                                           item=s.config.init.item)
    log.info("initialised from %s step %s (%s)", path, step, s.config.init.item)
    return params
  return init_params_sharded(s, jax.random.key(int(s.config.seed)))


def create_state(s: Setup, params: Optional[Any] = None) -> TrainState:
  """A fresh train state from the full parameters (`initial_params` by default); the modules kept outside the
  state are dropped from it (`outside_params` keeps them)."""
  params = initial_params(s) if params is None else params
  ema = s.config.optim.ema_decay > 0
  with jax.set_mesh(s.mesh):
    return jax.jit(lambda p: init_state({k: v for k, v in p.items() if k not in s.outside_shardings}, s.tx, ema,
                                        s.mask),
                   out_shardings=s.state_shardings)(params)


def outside_params(s: Setup, params: Any) -> Dict[str, Any]:
  return {k: params[k] for k in s.outside_shardings}


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------

class _StopFlag:
  """Set by SIGTERM (preemption notice): save and exit at the next step boundary."""

  def __init__(self):
    self.set = False
    self._old = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.set = True

  def uninstall(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


LOG_KEYS = ("loss", "ce", "mse", "grad_norm", "lr", "tokens_per_s", "mfu")


def train(config, workdir: str, devices=None, start_over: bool = False) -> Dict[str, Any]:
  """Runs (or resumes) the configured training; returns the last logged metrics.

  `start_over`: if every checkpoint in the workdir is unreadable, set them aside and start from step 0
  (without it that case raises `UnreadableCheckpointsError`). A fresh start never overwrites an existing
  metrics history: it is kept as `metrics.previous-<N>.jsonl`."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  s = make_setup(config, devices)
  pidx, pcount = jax.process_index(), jax.process_count()
  data_iter = inputs.make_input(s.run, s.local_spec, pidx, pcount)  # opens and checks the data sources, once
  if pidx == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), s.model_cfg,
                                    keep=config.train.keep_checkpoints, keep_period=config.train.keep_period,
                                    async_save=config.train.async_checkpoint)
  try:
    saved, restored_step = ckpt.restore(s.saved_abstract, data_iter, start_over=start_over)
  except BaseException:
    ckpt.close(quiet=True)
    raise
  if saved is None:
    params = initial_params(s)
    state, outside = create_state(s, params), outside_params(s, params)
    del params
    start = 0
    if pidx == 0:
      kept = metrics_lib.rotate_history(workdir)
      if kept:
        log.info("starting from step 0; the previous metrics history is kept as %s", ", ".join(kept))
  else:
    state, outside = from_saved(s, saved)
    start = restored_step
    log.info("resumed from step %d", start)
  del saved
  writer = metrics_lib.create_writer(workdir, pidx, tensorboard=config.train.tensorboard)
  if pidx == 0 and isinstance(getattr(writer, "writers", [None])[0], metrics_lib.JsonlCsvWriter):
    writer.writers[0].truncate_after(start)
    writer.write_hparams(config.to_dict())
  _log_parameter_overview(state.params, workdir, pidx)

  total = int(config.train.steps)
  progress = metrics_lib.Progress(total, start)
  stop = _StopFlag()
  stop.install()
  device_kind = s.mesh.devices.flat[0].device_kind
  n_dev = s.mesh.devices.size
  last: Dict[str, Any] = {}
  pending = None  # (step, metrics, batch index) of the previous step, checked after the next is dispatched
  window_flops = window_tokens = 0.0
  window_metrics = []  # device metrics of the steps since the last log, fetched once per log
  tokens_seen = _tokens_seen_at(workdir, start)  # real (non-padding) tokens, all hosts; the emergence x-axis
  window_t = time.time()
  step = start
  nan_at = int(config.train.get("debug_nan_at_step", 0) or 0)
  failing = True
  try:
    while step < total:
      batch_index = step
      local = next(data_iter)
      if config.train.validate_batches:
        batch_lib.validate(local, s.local_spec)
      fl = flops_lib.step_flops(local, s.model_cfg)
      window_flops += fl["total"] * pcount
      window_tokens += fl["tokens"] * pcount
      tokens_seen += fl["tokens"] * pcount
      with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        state, m = s.step_fn(state, inputs.to_global(local, s.mesh))
      step += 1
      if nan_at and step == nan_at:  # fault injection: a transient blow-up of the state after this step
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact)
                                                  else x, state.params))
      ckpt.check()  # a failed async save stops the run here, not later with unrelated errors
      if pending is not None:
        _check_finite(pending, ckpt)
      pending = (step, m, batch_index)
      window_metrics.append(m)
      if step % config.train.log_every == 0 or step == total:
        _check_finite(pending, ckpt)
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = time.time() - window_t
        host["tokens_per_s"] = window_tokens / dt
        host["step_time_s"] = dt / (config.train.log_every if step % config.train.log_every == 0 else 1)
        host["model_tflops_per_s"] = window_flops / dt / 1e12
        host["mfu"] = flops_lib.mfu(window_flops, dt, n_dev, device_kind)
        host.update(window_means(jax.device_get(window_metrics)))
        host["tokens_seen"] = float(tokens_seen)
        window_metrics = []
        for k, v in getattr(data_iter, "stats", {}).items():
          host[f"data/{k}"] = float(v)
        writer.write_scalars(step, {k: v for k, v in host.items() if not math.isnan(v)})
        if pidx == 0:
          progress.report(step, host, LOG_KEYS)
          if hasattr(data_iter, "stats_line"):
            log.info(data_iter.stats_line())  # records in = out + skipped (by reason) + buffered
        last = dict(host, step=step)
        window_flops = window_tokens = 0.0
        window_t = time.time()
      if config.train.plot_every and step % config.train.plot_every == 0 and pidx == 0:
        _plot(workdir)
      preempted = stop.set or (pcount > 1 and ckpt.reached_preemption(step))
      if step % config.train.checkpoint_every == 0 or step == total or preempted:
        if pending is not None:
          _check_finite(pending, ckpt)
        _check_state_finite(s, state, step, ckpt)
        ckpt.save(to_saved(s, state, outside), data_iter, force=preempted or step == total)
      if preempted:
        log.info("preemption notice: saved step %d, exiting", step)
        break
      if config.train.debug_kill_at_step and step == config.train.debug_kill_at_step:
        ckpt.wait()  # deterministic drill: the last save has landed, then an abrupt death without cleanup
        os.kill(os.getpid(), signal.SIGKILL)
      if config.train.get("debug_kill_in_save_at_step", 0) and step == config.train.debug_kill_in_save_at_step:
        os.kill(os.getpid(), signal.SIGKILL)  # drill: dies while the async save of this step is in flight
    failing = False
  finally:
    stop.uninstall()
    ckpt.close(quiet=failing)  # when already failing, the original error is the one to report
    if hasattr(data_iter, "close"):
      data_iter.close()
  if pidx == 0:
    _plot(workdir)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in last.items()}
      json.dump(dict(finite, final_step=step, model=config_lib.to_dict(s.model_cfg)), f, indent=1, default=str)
  return last


def _tokens_seen_at(workdir: str, step: int) -> float:
  """Tokens seen up to `step`, from the metrics log of the run being resumed (0 for a fresh run)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not step or not os.path.exists(path):
    return 0.0
  best = 0.0
  for row in metrics_lib.read_jsonl(path):
    if row.get("step", 0) <= step and "tokens_seen" in row:
      best = max(best, float(row["tokens_seen"]))
  return best


def window_means(history) -> Dict[str, float]:
  """Per-log-window means for smooth curves: CE and MSE weighted by their token counts (the loss of each step
  is already normalised by its own counts), loss averaged over steps."""
  out = {"loss_avg": float(np.mean([float(m["loss"]) for m in history]))}
  for k in ("ce", "mse"):
    n = sum(float(m[f"{k}_count"]) for m in history)
    if n > 0:
      out[f"{k}_avg"] = sum(float(m[k]) * float(m[f"{k}_count"]) for m in history) / n
  return out


def _check_finite(pending, ckpt):
  step, m, batch_index = pending
  loss = float(jax.device_get(m["loss"]))
  if not math.isfinite(loss):
    raise NonFiniteLossError(f"loss is {loss} at step {step} (batch index {batch_index}); stopping. "
                             + _resume_hint(ckpt))


def _check_state_finite(s: Setup, state, step: int, ckpt):
  """A checkpoint is written only when params, optimizer state and EMA are finite."""
  with jax.set_mesh(s.mesh):
    ok = bool(jax.device_get(s.finite_fn(state)))
  if not ok:
    raise NonFiniteLossError(f"the training state (params, optimizer state or EMA) is not finite after step {step}; "
                             f"it was not saved. " + _resume_hint(ckpt))


def _resume_hint(ckpt) -> str:
  ckpt.wait()
  last = ckpt.latest_step()
  where = (f"The last good checkpoint is step {last} in {ckpt.directory} (every saved checkpoint passed a "
           f"finiteness check); rerunning the same command resumes from it" if last is not None else
           f"No checkpoint was saved yet in {ckpt.directory}; rerunning starts from step 0")
  return (f"{where}, and replays the same batches, so change what blew up: e.g. a lower learning rate "
          f"(--config.optim.lr=...), gradient clipping (--config.optim.clip_norm=1.0), a longer warm-up "
          f"(--config.optim.warmup_steps=...), or another data order (--config.data.seed=...)")


def _plot(workdir: str):
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    metrics_lib.plot_curves(path, os.path.join(workdir, "loss_curves.png"))


def _log_parameter_overview(params, workdir: str, pidx: int):
  if pidx:
    return
  try:
    from clu import parameter_overview  # pylint: disable=import-outside-toplevel
    text = parameter_overview.get_parameter_overview(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                  params), include_stats=False)
  except Exception as e:  # pylint: disable=broad-except
    text = f"(parameter overview unavailable: {e})"
  with open(os.path.join(workdir, "parameters.txt"), "w") as f:
    f.write(text + "\n")
