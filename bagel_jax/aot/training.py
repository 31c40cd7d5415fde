"""The training step compiled for a TPU topology: memory, structure, and the per-step cost and roofline.

How the cost is counted (XLA's `cost_analysis()` counts a `scan` body once): the step is compiled again with
(1, 1), (2, 1) and (1, 2) (LLM, ViT) *unrolled* layers and the CE loss unchunked (no loops left), and
extrapolated linearly to the real depth; the attention kernels' cost estimates assume the non-empty tile
fraction measured on the representative row (`ops.assume_tile_fraction`).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import numpy as np

from bagel_jax.aot import costs, libtpu, rows as rows_lib
from bagel_jax.kernels import ops
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.parallel import rules as rules_lib
from bagel_jax.parallel import topology as topology_lib
from bagel_jax.train import flops as flops_lib
from bagel_jax.train import trainer

HEADROOM_TARGET = 0.85  # issue #9: total per-chip memory <= 85% of HBM


def compile_step(config, devices, topology: str, tile_fraction=None):
  """Lowers and compiles the jitted train step for `devices`; returns (compiled, setup, seconds)."""
  s = trainer.make_setup(config, devices=devices, check_data=False)
  batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.spec.abstract(),
                       rules_lib.batch_shardings(s.mesh, s.spec.abstract()))
  options = libtpu.compiler_options(topology)  # probed outside the mesh context
  t0 = time.time()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules), ops.assume_tile_fraction(tile_fraction):
    lowered = s.step_fn.lower(s.abstract_state, batch)
    compiled = lowered.compile(compiler_options=options)
  return compiled, s, time.time() - t0


def unrolled_variant(config, llm_layers: int, vit_layers: int):
  """The config with this many unrolled layers and the CE unchunked: no loops left for cost analysis."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.llm_overrides = dict(num_layers=llm_layers)
    c.model.vit_layers = vit_layers
    c.model.scan_layers = False
    c.model.ce_chunk_size = 0
  return c


def memory_report(compiled, chip: topology_lib.Chip) -> Dict[str, Any]:
  mem = costs.memory(compiled)
  return dict(mem, hbm_bytes=chip.hbm_bytes, fraction_of_hbm=mem["total_bytes"] / chip.hbm_bytes,
              fits_with_headroom=mem["total_bytes"] <= HEADROOM_TARGET * chip.hbm_bytes)


def analyse(config, topology: str, num_slices: int = 1, extrapolate: bool = True,
            variant_topology: Optional[str] = None) -> Dict[str, Any]:
  """The train-step part of the report for one config on one topology (see bagel_jax/aot/__init__.py)."""
  gen, name, _ = topology_lib.parse(topology)
  chip = topology_lib.CHIPS[gen]
  devices = libtpu.topology_devices(topology, num_slices)
  n_dev = len(devices)
  model_cfg = trainer.build_model_config(config)
  row = rows_lib.representative_row(config, model_cfg)
  fractions = rows_lib.tile_fractions(row)
  compiled, s, seconds = compile_step(config, devices, topology, fractions)
  text = compiled.as_text()
  report: Dict[str, Any] = dict(
      config=config.name, stage=config.stage, topology=topology, topology_name=name, num_slices=num_slices,
      devices=n_dev, device_kind=devices[0].device_kind, compile_seconds=round(seconds, 1),
      compiler_options=libtpu.compiler_options(topology),
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
  row_flops = flops_lib.step_flops(row, s.model_cfg)
  model_flops = row_flops["total"] * s.spec.batch_size
  report["model_flops_per_step"] = model_flops
  report["model_flops_breakdown_per_row"] = dict(row_flops)
  report["representative_row_fill"] = row_flops["tokens"] / s.spec.seq_len
  report["xla_cost_analysis_raw"] = dict(costs.cost(compiled), collectives=costs.collective_bytes(text),
                                         note="scan bodies counted once: not a per-step total; optimal_seconds "
                                              "is XLA's own estimate for this (scanned) program")
  if extrapolate:
    report.update(_extrapolated(config, devices, topology, fractions, s, chip, model_flops, n_dev,
                                report["representative_row_fill"], variant_topology))
  return report


def per_chip_rows_config(config, n_from: int, n_to: int):
  """The config on a slice of `n_to` chips with the same rows per chip as on `n_from` chips."""
  c = copy.deepcopy(config)
  with c.unlocked():
    rows_per_chip = c.batch.batch_size / n_from
    if rows_per_chip * n_to != int(rows_per_chip * n_to) or rows_per_chip * n_to < 1:
      raise ValueError(f"--variant_topology: {c.batch.batch_size} rows on {n_from} chips do not map to {n_to} chips")
    c.batch.batch_size = int(rows_per_chip * n_to)
    c.mesh.dcn.data = 1
  return c


def _extrapolated(config, devices, topology, fractions, s, chip, model_flops, n_dev,
                  fill_fraction: float, variant_topology: Optional[str] = None) -> Dict[str, Any]:
  lc, vc = s.model_cfg.llm, s.model_cfg.vit
  parts, secs = {}, 0.0
  vtopo = variant_topology or topology
  if vtopo != topology:
    if topology_lib.generation(vtopo) != topology_lib.generation(topology):
      raise ValueError(f"--variant_topology {vtopo} must be the same TPU generation as {topology}")
    vdevices = libtpu.topology_devices(vtopo)
    config = per_chip_rows_config(config, n_dev, len(vdevices))
  else:
    vdevices = devices
  for key, (nl, nv) in dict(base=(1, 1), llm2=(2, 1), vit2=(1, 2)).items():
    comp_k, _, sec = compile_step(unrolled_variant(config, nl, nv), vdevices, vtopo, fractions)
    secs += sec
    coll = costs.collective_bytes(comp_k.as_text())
    parts[key] = dict(costs.cost(comp_k), coll=sum(coll.values()), traffic=costs.collective_traffic(coll),
                      collectives=coll)
  keys = ("flops", "bytes", "coll", "traffic")
  per_llm = {k: parts["llm2"][k] - parts["base"][k] for k in keys}
  per_vit = {k: parts["vit2"][k] - parts["base"][k] for k in keys}
  base = {k: parts["base"][k] - per_llm[k] - per_vit[k] for k in keys}
  segments = dict(base=(base, 1), llm_layers=(per_llm, lc.num_layers), vit_layers=(per_vit, vc.num_layers))
  total = {k: sum(seg[k] * n for seg, n in segments.values()) for k in keys}
  compiled_flops_total = total["flops"] * n_dev  # cost_analysis figures are per device
  rl = costs.segments_roofline(segments, chip)
  overlapped = max(rl["compute_seconds"], rl["collective_seconds"])
  exposed = rl["compute_seconds"] + rl["collective_seconds"]
  serial = rl["compute_seconds_serial"] + rl["collective_seconds"]
  peak_all = chip.peak_flops * n_dev
  tokens = s.spec.batch_size * s.spec.seq_len
  limits = dict(matmul_flops=rl["flops_seconds"], hbm_traffic=rl["hbm_seconds"],
                collectives=rl["collective_seconds"])
  return dict(
      compiled=dict(
          flops_per_step=compiled_flops_total, flops_per_chip=total["flops"], bytes_per_chip=total["bytes"],
          collective_bytes_per_chip=total["coll"], collective_link_traffic_per_chip=total["traffic"],
          recompute_ratio=compiled_flops_total / model_flops if model_flops else float("nan"),
          per_llm_layer=per_llm, per_vit_layer=per_vit,
          non_layer=base, collectives_base=parts["base"]["collectives"],
          variant_compile_seconds=round(secs, 1), variant_topology=vtopo,
          method=("1/2-layer unrolled compiles, CE unchunked, extrapolated to the full depth" +
                  ("" if vtopo == topology else
                   f"; compiled on {vtopo} with the same rows per chip (per-chip FLOPs and bytes are those of "
                   f"the full slice; FSDP collectives are counted as full-buffer bytes, which do not depend on "
                   f"the slice size)"))),
      roofline=dict(
          compute_seconds=rl["compute_seconds"], compute_seconds_serial=rl["compute_seconds_serial"],
          matmul_seconds_at_peak=rl["flops_seconds"], hbm_seconds=rl["hbm_seconds"],
          collective_seconds=rl["collective_seconds"],
          step_seconds_overlapped=overlapped, step_seconds_exposed=exposed, step_seconds_serial=serial,
          mfu_estimate_overlapped=model_flops / (overlapped * peak_all),
          mfu_estimate_exposed=model_flops / (exposed * peak_all),
          mfu_estimate_serial=model_flops / (serial * peak_all),
          mfu_upper_bound_compute_only=model_flops / (rl["flops_seconds"] * peak_all),
          limited_by=max(limits, key=limits.get),
          tokens_per_second_per_chip=tokens * fill_fraction / overlapped / n_dev,
          assumptions=("per segment (non-layer / LLM layer / ViT layer) max(FLOPs/peak, bytes/HBM-bw), "
                       "'serial' adds them; layers extrapolated from 1- and 2-layer unrolled compiles; attention "
                       "kernels costed at the representative row's non-empty tile fraction; collectives at half "
                       "the per-chip bidirectional ICI bandwidth (all-reduce counted twice), 'overlapped' hides "
                       "them behind compute, 'exposed' adds them; model FLOPs of a representative row of the "
                       "stage mix; an estimate, not a measurement")))


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
                        budget: float = HEADROOM_TARGET) -> Dict[str, Any]:
  """Largest row length (= per-chip tokens at one row per chip) whose compiled total stays within `budget` of
  HBM (and compiles at all), by bisection on multiples of `step`."""
  hbm = topology_lib.chip(topology).hbm_bytes
  devices = libtpu.topology_devices(topology)
  tried = {}
  lo, hi = lo // step * step, -(-hi // step) * step
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    try:
      compiled, _, _ = compile_step(scale_batch(config, mid), devices, topology)
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
