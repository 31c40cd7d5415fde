"""The training step compiled for a TPU topology: memory, structure, and the per-step cost and roofline.

One compile of the step that runs (scanned layers, remat, chunked CE). Its cost is counted from the compiled
HLO with every loop body times its trip count (`hlo`); the attention kernels' cost estimates assume the
non-empty tile fraction measured on the representative row (`ops.assume_tile_fraction`). Earlier versions
compiled 1-/2-layer unrolled copies and extrapolated: with `nn.remat(prevent_cse=False)` the compiler
removed most of the rematerialised forward from those copies, so they undercounted the step.
"""
from __future__ import annotations

import copy
import os
import resource
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import numpy as np

from bagel_jax.aot import costs, hlo, libtpu, rows as rows_lib
from bagel_jax.kernels import ops
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.parallel import rules as rules_lib
from bagel_jax.parallel import topology as topology_lib
from bagel_jax.train import flops as flops_lib
from bagel_jax.train import config as train_config
from bagel_jax.train import trainer

HEADROOM_TARGET = 0.85  # issue #9: total per-chip memory <= 85% of HBM
REPRESENTATIVE_ROWS = 8  # rows of the stage mix packed by the real packer; model FLOPs are their mean


def compile_step(config, devices, topology: str, tile_fraction=None, effort: str = libtpu.CHECK_EFFORT):
  """Lowers and compiles the jitted train step for `devices` at XLA optimisation `effort`; returns (compiled,
  setup, timing) with timing = {lower_seconds, compile_seconds (wall), compile_cpu_seconds (this process, all
  threads), peak_rss_bytes}."""
  s = trainer.make_setup(config, devices=devices, check_data=False)
  batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.spec.abstract(),
                       rules_lib.batch_shardings(s.mesh, s.spec.abstract()))
  options = libtpu.compiler_options(topology, effort)  # probed outside the mesh context
  t0 = time.time()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules), ops.assume_tile_fraction(tile_fraction):
    lowered = s.step_fn.lower(s.abstract_state, batch)
    t1, cpu1 = time.time(), _cpu_seconds()
    compiled = lowered.compile(compiler_options=options)
  timing = dict(lower_seconds=round(t1 - t0, 1), compile_seconds=round(time.time() - t1, 1),
                compile_cpu_seconds=round(_cpu_seconds() - cpu1, 1),
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return compiled, s, timing


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def memory_report(compiled, chip: topology_lib.Chip) -> Dict[str, Any]:
  mem = costs.memory(compiled)
  return dict(mem, hbm_bytes=chip.hbm_bytes, fraction_of_hbm=mem["total_bytes"] / chip.hbm_bytes,
              fits_with_headroom=mem["total_bytes"] <= HEADROOM_TARGET * chip.hbm_bytes)


def analyse(config, topology: str, num_slices: int = 1, rates: Optional[costs.Rates] = None,
            effort: str = libtpu.CHECK_EFFORT) -> Dict[str, Any]:
  """The train-step part of the report for one config on one topology: one compile of the step that runs (at
  XLA optimisation `effort`, see libtpu.CHECK_EFFORT)."""
  gen, name, _ = topology_lib.parse(topology)
  chip = topology_lib.CHIPS[gen]
  devices = libtpu.topology_devices(topology, num_slices)
  n_dev = len(devices)
  model_cfg = train_config.model_config(config)
  rows = rows_lib.representative_rows(config, model_cfg, REPRESENTATIVE_ROWS)
  fractions = rows_lib.tile_fractions(rows)
  compiled, s, timing = compile_step(config, devices, topology, fractions, effort)
  text = compiled.as_text()
  report: Dict[str, Any] = dict(
      config=config.name, stage=config.stage, topology=topology, topology_name=name, num_slices=num_slices,
      devices=n_dev, device_kind=devices[0].device_kind, compile_seconds=timing["compile_seconds"],
      compiler_effort=effort,
      host=dict(timing, cpu_count=os.cpu_count(),
                note="peak_rss_bytes: this process's peak resident memory so far (the compile's high-water mark "
                     "when it is the first); compile_cpu_seconds: user + system time of all its threads"),
      compiler_options=libtpu.compiler_options(topology, effort),
      rejected_compiler_options=list(libtpu.rejected_compiler_options(topology)),
      global_batch_rows=s.spec.batch_size, seq_len=s.spec.seq_len,
      tokens_per_chip=s.spec.batch_size * s.spec.seq_len / n_dev,
      model=dict(preset=config.model.preset, variant=s.model_cfg.llm.layer_variant,
                 attention_impl=s.model_cfg.attention_impl, remat_policy=s.model_cfg.remat_policy,
                 scan_layers=s.model_cfg.scan_layers, ce_chunk_size=s.model_cfg.ce_chunk_size,
                 dtype=s.model_cfg.dtype, param_dtype=s.model_cfg.param_dtype,
                 params=int(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(s.abstract_state.params))),
                 mesh=dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
                 rules=config.mesh.rules, ema=bool(s.abstract_state.ema is not None)),
      memory_per_chip=memory_report(compiled, chip),
      attention=dict(kernels=costs.kernels(text), tile_fraction_assumed=fractions),
      largest_tensors=largest_tensors(s),
      sharding_shortfalls=shortfalls(s),
  )
  row_flops = {k: v / REPRESENTATIVE_ROWS for k, v in flops_lib.step_flops(rows, s.model_cfg).items()}
  model_flops = row_flops["total"] * s.spec.batch_size
  report["model_flops_per_step"] = model_flops
  report["model_flops_breakdown_per_row"] = row_flops
  report["representative_row_fill"] = row_flops["tokens"] / s.spec.seq_len
  report["representative_rows"] = representative_summary(rows, s.spec.seq_len)
  raw = costs.cost(compiled)
  report["xla_cost_analysis_raw"] = dict(raw, note="loop bodies counted once: not a per-step total; "
                                                   "optimal_seconds is XLA's own estimate for this program")
  tokens = s.spec.batch_size * s.spec.seq_len * report["representative_row_fill"]
  report.update(executed_costs(text, raw, rates or costs.Rates.for_chip(chip), model_flops, n_dev, tokens))
  return report


def executed_costs(text: str, raw: Dict[str, float], rates: costs.Rates, model_flops: float, n_dev: int,
                   tokens: float) -> Dict[str, Any]:
  """`compiled` (what the program executes per chip and step, loops x trip counts) and `roofline` (step time
  and MFU: a compute-only bound and an estimate at stated efficiencies, labelled as such)."""
  once = hlo.analyse(text, count_trips=False).total
  run = hlo.analyse(text, count_trips=True, op_seconds=rates.op_seconds)
  t = run.total
  g = lambda k: t.get(k, 0.0)
  executed = (g("mxu_flops") + g("kernel_flops")) * n_dev
  peak_all = rates.peak_flops * n_dev
  mfu = lambda seconds: model_flops / (seconds * peak_all) if seconds > 0 else float("nan")
  counted_once = sum(once.get(k, 0.0) for k in ("mxu_flops", "kernel_flops", "vpu_flops"))
  t_comm = rates.collective_seconds(t)
  compiled = dict(
      flops_per_step=executed, flops_per_chip=executed / n_dev,
      matmul_flops_per_chip=g("mxu_flops"), kernel_flops_per_chip=g("kernel_flops"),
      vpu_flops_per_chip=g("vpu_flops"), transcendentals_per_chip=g("transcendentals") + g("kernel_transcendentals"),
      gather_scatter_bytes_per_chip=g("gather_bytes"), bytes_per_chip=g("hbm_bytes"),
      collective_bytes_per_chip=g("collective_bytes"),
      collectives={k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("collective/")},
      recompute_ratio=executed / model_flops if model_flops else float("nan"),
      loops=[dict(label=l.label, trips=l.trips, matmul_flops=l.per_iteration.get("mxu_flops", 0.0),
                  kernel_flops=l.per_iteration.get("kernel_flops", 0.0),
                  hbm_bytes=l.per_iteration.get("hbm_bytes", 0.0)) for l in run.loops],
      loops_with_unknown_trip_count=run.unknown_trips,
      check_against_xla=dict(
          flops_counted_once=counted_once, xla_flops=raw["flops"],
          ratio=counted_once / raw["flops"] if raw["flops"] else float("nan"),
          note="the same HLO with every loop body counted once, against XLA's cost_analysis (which counts "
               "them once): 1 when the instruction rules agree"),
      method=("loop-aware count of the compiled step: every computation of the optimised HLO once per "
              "execution (while bodies x trip counts), XLA HloCostAnalysis rules per instruction, the Pallas "
              "kernels through their cost estimates at the representative row's tile fraction"))
  est_overlapped, est_exposed = max(g("t_estimate"), t_comm), g("t_estimate") + t_comm
  limits = dict(matmul_flops=g("t_bound"), hbm_traffic=g("hbm_bytes") / rates.hbm_bw, collectives=t_comm,
                non_matmul_work=g("t_estimate") - g("t_bound"))
  roofline = dict(
      compute_only_seconds=g("t_bound"), roofline_at_peak_seconds=g("t_roofline"),
      estimate_seconds=g("t_estimate"), collective_seconds=t_comm, hbm_seconds=g("hbm_bytes") / rates.hbm_bw,
      step_seconds_overlapped=est_overlapped, step_seconds_exposed=est_exposed,
      mfu_upper_bound_compute_only=mfu(g("t_bound")),
      mfu_estimate_overlapped=mfu(est_overlapped), mfu_estimate_exposed=mfu(est_exposed),
      mfu_roofline_at_peak=mfu(max(g("t_roofline"), t_comm)),
      limited_by=max(limits, key=limits.get),
      tokens_per_second_per_chip=tokens / est_overlapped / n_dev if est_overlapped else float("nan"),
      efficiencies=rates.assumptions(),
      assumptions=("ESTIMATES, not measurements. compute-only bound: model FLOPs / (executed matmul + kernel "
                   "FLOPs at the MXU peak), nothing else costs time. estimate: every top-level op of the "
                   "compiled step (loops x trip counts) costs the slowest of its units, XLA matmuls at the MXU "
                   "peak, Pallas kernels at kernel_efficiency of it, elementwise work at vpu_ops_per_s, "
                   "transcendentals at transcendentals_per_s, MoT gathers/scatters at gather_scatter_efficiency "
                   "of the HBM bandwidth, other bytes at full HBM bandwidth; ops run one after another; "
                   "collectives at half the per-chip ICI bandwidth (all-reduce twice), hidden behind compute "
                   "('overlapped') or added ('exposed'). Model FLOPs of a representative row of the stage mix."))
  return dict(compiled=compiled, roofline=roofline)


def representative_summary(rows, seq_len: int) -> Dict[str, Any]:
  """What the model FLOPs were counted on: fill and documents per row (their spread), the packer's binding
  capacity."""
  fill = (np.asarray(rows["document"]) > 0).mean(axis=1)
  return dict(rows=int(fill.size), fill=rows_lib.spread(fill), documents=rows_lib.spread(rows["num_documents"]),
              vit_tokens=rows_lib.spread((np.asarray(rows["vit_image"]) > 0).sum(axis=1)),
              latent_tokens=rows_lib.spread((np.asarray(rows["latent_image"]) > 0).sum(axis=1)),
              source="bagel_jax/aot/rows.py: the stage mix's samples packed by data.pipeline.PackBatches "
                     "(second batch, steady state)")


def per_chip_rows_config(config, n_from: int, n_to: int):
  """The config on a slice of `n_to` chips with the same rows per chip as on `n_from` chips."""
  c = copy.deepcopy(config)
  with c.unlocked():
    rows_per_chip = c.batch.batch_size / n_from
    if rows_per_chip * n_to != int(rows_per_chip * n_to) or rows_per_chip * n_to < 1:
      raise ValueError(f"--inference_topology: {c.batch.batch_size} rows on {n_from} chips do not map to {n_to} chips")
    c.batch.batch_size = int(rows_per_chip * n_to)
    c.mesh.dcn.data = 1
  return c


def largest_tensors(s, n: int = 8):
  """The `n` largest arrays of the train state, with their sharding and per-chip bytes."""
  leaves = jax.tree_util.tree_flatten_with_path(s.abstract_state)[0]
  leaves.sort(key=lambda kv: -int(np.prod(kv[1].shape)) * kv[1].dtype.itemsize)
  out = []
  for p, a in leaves[:n]:
    shard = a.sharding.shard_shape(a.shape) if hasattr(a.sharding, "shard_shape") else a.shape
    out.append(dict(path=jax.tree_util.keystr(p), shape=list(a.shape), dtype=str(a.dtype),
                    sharding=str(a.sharding.spec), per_chip_shape=list(shard),
                    per_chip_bytes=int(np.prod(shard)) * a.dtype.itemsize))
  return out


def shortfalls(s, n: int = 5) -> Dict[str, Any]:
  """Parameters the rules wanted sharded further than the mesh divides (see rules.sharding_shortfalls); their
  optimizer and EMA copies follow the parameter's sharding, so the state pays the extra several times."""
  found = rules_lib.sharding_shortfalls(bagel_lib.param_logical_axes(s.model_cfg), s.abstract_state.params,
                                        s.mesh, s.rules)
  return dict(count=len(found), extra_param_bytes_per_chip=int(sum(r[-1] for r in found)),
              largest=[dict(path=p, shape=list(shape), wanted=str(w), got=str(g), extra_bytes_per_chip=int(b))
                       for p, shape, w, g, b in found[:n]])


# ----------------------------------------------------------------------------------------------------------
# Sweeps.
# ----------------------------------------------------------------------------------------------------------

def scale_batch(config, seq_len: int):
  """The config with rows of `seq_len` tokens, every per-row capacity scaled in proportion."""
  c = copy.deepcopy(config)
  with c.unlocked():
    scale = seq_len / c.batch.seq_len
    c.batch.seq_len = seq_len
    for k in ("latent_capacity", "und_capacity", "vit_capacity", "ce_capacity"):
      if c.batch[k]:
        c.batch[k] = min(seq_len, max(1, int(c.batch[k] * scale)))
  return c


def max_fitting_seq_len(config, topology: str, lo: int, hi: int, step: int = 1024,
                        budget: float = HEADROOM_TARGET, effort: str = libtpu.CHECK_EFFORT) -> Dict[str, Any]:
  """Largest row length (= per-chip tokens at one row per chip) whose compiled total stays within `budget` of
  HBM (and compiles at all), by bisection on multiples of `step`."""
  hbm = topology_lib.chip(topology).hbm_bytes
  devices = libtpu.topology_devices(topology)
  tried = {}
  lo, hi = lo // step * step, -(-hi // step) * step
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    try:
      compiled, _, _ = compile_step(scale_batch(config, mid), devices, topology, effort=effort)
      total = costs.memory(compiled)["total_bytes"]
      tried[mid] = total / 2 ** 30
      ok = total <= budget * hbm
    except Exception as e:  # pylint: disable=broad-except
      if not costs.is_oom(e):
        raise
      tried[mid] = "OOM"
      ok = False
    lo, hi = (mid, hi) if ok else (lo, mid)
  return dict(max_seq_len=lo, budget_fraction=budget, tried_gib=tried)
