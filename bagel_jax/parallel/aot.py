"""`bagel-aot`: compile the real training step for a TPU topology on this CPU host and report whether it fits
and how fast it should run. No TPU and no weights are needed (libtpu + `get_topology_desc`, abstract state).

What XLA reports and what it does not (measured, jax 0.10.2): `memory_analysis()` is the per-chip budget the
pod will use. `cost_analysis()` counts a `scan` body once and Pallas kernels through their `cost_estimate`,
and its `optimal_seconds` is not usable for a scanned program. So the report carries:
  (1) analytic model FLOPs (bagel_jax/train/flops.py) of a representative packed row of the stage's mix;
  (2) compiled FLOPs and bytes with loop bodies multiplied by their trip counts: the step is compiled with
      (1, 1), (2, 1) and (1, 2) (LLM, ViT) layers and extrapolated linearly to the real depth; the ratio to (1)
      is the recompute (remat) overhead;
  (3) a roofline step time: each segment (non-layer part, LLM layers, ViT layers) costs
      max(FLOPs / peak, bytes / HBM bandwidth); collectives (all-gather, reduce-scatter, all-reduce, ...) are
      summed from the compiled HLO, extrapolated the same way, and timed at the chip's ICI bandwidth — reported
      both overlapped with compute (async collective fusion on) and fully exposed;
  (4) the MFU estimate (1) / (3) / peak — an estimate with these assumptions, not a measurement.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

# Per-chip facts (guide C1): bf16 peak, HBM bytes, HBM bandwidth, ICI bandwidth per chip (bidirectional; one
# direction is used for ring collectives: half of it).
CHIPS = {
    "v5p": dict(peak=459e12, hbm=95 * 2 ** 30, hbm_bw=2765e9, ici_bw=1200e9),
    "v6e": dict(peak=918e12, hbm=32 * 2 ** 30, hbm_bw=1638e9, ici_bw=800e9),
    "v5e": dict(peak=197e12, hbm=16 * 2 ** 30, hbm_bw=819e9, ici_bw=400e9),
    "v4": dict(peak=275e12, hbm=32 * 2 ** 30, hbm_bw=1200e9, ici_bw=540e9),
}
_V5P_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
               512: "8x8x8"}
_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology_name(topology: str) -> tuple:
  """'v5p-256' -> ('v5p', 'v5p:4x4x8', chips); 'v6e-16' -> ('v6e', 'v6e:4x4', 16); 'v5p:2x2x1' passes."""
  if ":" in topology:
    gen = topology.split(":")[0].replace("v5litepod", "v5e")
    chips = int(np.prod([int(x) for x in topology.split(":")[1].split("x")]))
    return gen, topology, chips
  m = re.fullmatch(r"(v5p|v6e|v5e|v5litepod|v4)-(\d+)", topology)
  if not m:
    raise ValueError(f"--topology {topology!r}: expected e.g. v5p-256, v6e-256, v5e-16 or v5p:4x4x4")
  gen, n = m.group(1).replace("v5litepod", "v5e"), int(m.group(2))
  if gen in ("v5p", "v4"):
    chips = n // 2  # names count TensorCores; one megacore chip has two
    shapes = _V5P_SHAPES
  else:
    chips, shapes = n, _2D_SHAPES
  if chips not in shapes:
    raise ValueError(f"--topology {topology}: no known slice shape for {chips} chips")
  return gen, f"{gen}:{shapes[chips]}", chips


def topology_devices(topology: str, num_slices: int = 1):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  gen, name, _ = topology_name(topology)
  kw = dict(chip_config_name="megacore") if gen in ("v5p", "v4") else {}
  if num_slices > 1:
    kw["num_slices"] = num_slices
  return topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices


# ----------------------------------------------------------------------------------------------------------
# Representative packed row of a stage mix (for model FLOPs).
# ----------------------------------------------------------------------------------------------------------

def representative_row(config, model_cfg, stage_ratios: Optional[Dict[str, float]] = None, gen_px: int = 512,
                       und_px: int = 448):
  """One row of `config.batch` capacities filled greedily with samples of each data kind in proportion to the
  stage ratios (caption 64 tokens, generation images of `gen_px`, understanding images of `und_px`, 4-frame
  video groups at half resolution, web documents with two images)."""
  from bagel_jax.data.sequence import (LayoutConfig, Text, VaeImage, VideoGroup, VitImage, assemble_batch,  # pylint: disable=import-outside-toplevel
                                       fits, layout_sample)
  from bagel_jax.train.trainer import build_batch_spec  # pylint: disable=import-outside-toplevel
  spec = build_batch_spec(config, model_cfg, batch_size=1)
  layout = LayoutConfig.from_model_config(model_cfg)
  ratios = stage_ratios or dict(text=0.05, t2i=0.6, i2t=0.1, interleaved_und=0.1, video=0.1, web=0.05)
  lat_side = min(gen_px // model_cfg.latent_downsample, model_cfg.max_latent_size)
  vit_side = min(und_px // model_cfg.vit.patch_size, model_cfg.vit.max_patches_per_side)
  c, p = model_cfg.latent_channels, model_cfg.vit.patch_dim
  vae = lambda side, noisy: VaeImage((side, side), latents=np.zeros((side * side, c), np.float32), noisy=noisy)
  vit = lambda side: VitImage(np.zeros((side * side, p), np.float32), (side, side))
  text = lambda n, loss: Text([5] * n, loss=loss)
  kinds = {
      "text": lambda: [text(1024, True)],
      "t2i": lambda: [text(64, False), vae(lat_side, True)],
      "i2t": lambda: [vit(vit_side), text(32, False), text(64, True)],
      "interleaved_und": lambda: [vit(vit_side), text(64, False), vit(vit_side), text(128, True)],
      "video": lambda: [text(30, False), vae(lat_side // 2, False),
                        VideoGroup([vae(lat_side // 2, False) for _ in range(3)], [1, 1, 1])],
      "web": lambda: [text(128, False), vae(lat_side, False), vit(vit_side), text(256, True), vae(lat_side, True)],
  }
  order = [k for k, _ in sorted(ratios.items(), key=lambda kv: -kv[1]) if ratios[k] > 0]
  used = {k: 0.0 for k in order}
  row = []
  for _ in range(10_000):
    kind = min(order, key=lambda k: used[k] / ratios[k])  # keep the token shares close to the ratios
    s = layout_sample(kinds[kind](), layout)
    if not fits(row + [s], spec):
      break
    row.append(s)
    used[kind] += len(s)
  return assemble_batch([row], spec, layout)


# ----------------------------------------------------------------------------------------------------------
# Compile and analyse.
# ----------------------------------------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|"
                         r"collective-permute)(-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


def collective_bytes(hlo_text: str) -> Dict[str, float]:
  """Output bytes of every collective in a compiled HLO module, by kind (async starts count once)."""
  out: Dict[str, float] = {}
  for m in _COLLECTIVE.finditer(hlo_text):
    shapes = _SHAPE.findall(m.group(1))
    if not shapes:
      continue
    dt, dims = shapes[-1]  # for an async start tuple, the last element is the result buffer
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out[m.group(2)] = out.get(m.group(2), 0.0) + n * _BYTES[dt]
  return out


def _memory(compiled) -> Dict[str, float]:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: float(getattr(m, f, 0) or 0) for f in fields}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                        + out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"])
  return out


def _cost(compiled) -> Dict[str, float]:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)))


def compile_step(config, devices, topology: str):
  """Lowers and compiles the jitted train step for `devices`; returns (compiled, setup, seconds)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import rules as rules_lib, xla_flags  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import trainer  # pylint: disable=import-outside-toplevel
  s = trainer.make_setup(config, devices=devices, check_data=False)
  batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.spec.abstract(),
                       rules_lib.batch_shardings(s.mesh, s.spec.abstract()))
  t0 = time.time()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    lowered = s.step_fn.lower(s.abstract_state, batch)
    compiled = lowered.compile(compiler_options=xla_flags.compiler_options(topology))
  return compiled, s, time.time() - t0


def _with_layers(config, llm_layers: int, vit_layers: int):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.llm_overrides = dict(num_layers=llm_layers)
    c.model.vit_layers = vit_layers
  return c


def is_oom(e: Exception) -> bool:
  msg = str(e).lower()
  return "resource_exhausted" in msg or "ran out of memory" in msg or "out of memory" in msg


def analyse(config, topology: str, num_slices: int = 1, extrapolate: bool = True,
            stage_ratios: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
  """Full report for one config on one topology (see the module docstring for what each figure means)."""
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import trainer  # pylint: disable=import-outside-toplevel
  gen, name, chips = topology_name(topology)
  chip = CHIPS[gen]
  devices = topology_devices(topology, num_slices)
  n_dev = len(devices)
  compiled, s, seconds = compile_step(config, devices, topology)
  mem = _memory(compiled)
  report: Dict[str, Any] = dict(
      config=config.name, stage=config.stage, topology=topology, topology_name=name, num_slices=num_slices,
      devices=n_dev, device_kind=devices[0].device_kind, compile_seconds=round(seconds, 1),
      global_batch_rows=s.spec.batch_size, seq_len=s.spec.seq_len,
      tokens_per_chip=s.spec.batch_size * s.spec.seq_len / n_dev,
      memory_per_chip=dict(mem, hbm_bytes=chip["hbm"], fraction_of_hbm=mem["total_bytes"] / chip["hbm"]),
      model=dict(preset=s.model_cfg.llm.layer_variant, params=None),
      largest_tensors=_largest(s),
  )
  row = representative_row(config, s.model_cfg, stage_ratios)
  row_flops = flops_lib.step_flops(row, s.model_cfg)
  model_flops = row_flops["total"] * s.spec.batch_size
  report["model_flops_per_step"] = model_flops
  report["model_flops_breakdown_per_row"] = {k: v for k, v in row_flops.items()}
  report["representative_row_fill"] = row_flops["tokens"] / s.spec.seq_len
  xla_raw = _cost(compiled)
  report["xla_cost_analysis_raw"] = dict(xla_raw, note="scan bodies counted once; not a per-step total")

  if extrapolate:
    lc, vc = s.model_cfg.llm, s.model_cfg.vit
    parts = {}
    for key, (nl, nv) in dict(base=(1, 1), llm2=(2, 1), vit2=(1, 2)).items():
      c_k = _with_layers(config, nl, nv)
      comp_k, _, _ = compile_step(c_k, devices, topology)
      parts[key] = dict(_cost(comp_k), collectives=collective_bytes(comp_k.as_text()))
    per_llm = {k: parts["llm2"][k] - parts["base"][k] for k in ("flops", "bytes")}
    per_vit = {k: parts["vit2"][k] - parts["base"][k] for k in ("flops", "bytes")}
    base = {k: parts["base"][k] - per_llm[k] - per_vit[k] for k in ("flops", "bytes")}
    coll = lambda p: sum(p["collectives"].values())
    per_llm["coll"] = coll(parts["llm2"]) - coll(parts["base"])
    per_vit["coll"] = coll(parts["vit2"]) - coll(parts["base"])
    base["coll"] = coll(parts["base"]) - per_llm["coll"] - per_vit["coll"]
    segments = dict(base=(base, 1), llm_layers=(per_llm, lc.num_layers), vit_layers=(per_vit, vc.num_layers))
    total = {k: sum(seg[k] * n for seg, n in segments.values()) for k in ("flops", "bytes", "coll")}
    # cost_analysis figures are per device; model FLOPs are for the whole step.
    compiled_flops_total = total["flops"] * n_dev
    compute_t = sum(max(seg["flops"] * n / chip["peak"], seg["bytes"] * n / chip["hbm_bw"])
                    for seg, n in segments.values())
    comm_t = total["coll"] / (chip["ici_bw"] / 2)
    overlapped, exposed = max(compute_t, comm_t), compute_t + comm_t
    report["compiled"] = dict(
        flops_per_step=compiled_flops_total, bytes_per_chip=total["bytes"],
        collective_bytes_per_chip=total["coll"], recompute_ratio=compiled_flops_total / model_flops,
        per_llm_layer=per_llm, per_vit_layer=per_vit, non_layer=base,
        collectives_base=parts["base"]["collectives"])
    report["roofline"] = dict(
        compute_seconds=compute_t, collective_seconds=comm_t, step_seconds_overlapped=overlapped,
        step_seconds_exposed=exposed,
        mfu_estimate_overlapped=model_flops / (overlapped * chip["peak"] * n_dev),
        mfu_estimate_exposed=model_flops / (exposed * chip["peak"] * n_dev),
        tokens_per_second_per_chip=s.spec.batch_size * s.spec.seq_len * report["representative_row_fill"]
        / overlapped / n_dev,
        assumptions=("per-segment max(FLOPs/peak, bytes/HBM-bw); layers extrapolated from 1- and 2-layer "
                     "compiles; collectives at half the per-chip ICI bandwidth; model FLOPs of a representative "
                     "row of the stage mix; an estimate, not a measurement"))
  del jax, trainer
  return report


def _largest(s, n: int = 8):
  import jax  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_flatten_with_path(s.abstract_state.params)[0]
  leaves.sort(key=lambda kv: -int(np.prod(kv[1].shape)))
  return [dict(path=jax.tree_util.keystr(p), shape=list(a.shape), dtype=str(a.dtype),
               sharding=str(a.sharding.spec)) for p, a in leaves[:n]]


def max_fitting_seq_len(config, topology: str, lo: int, hi: int, step: int = 1024) -> Dict[str, Any]:
  """Largest row length (per-chip tokens at one row per chip) that compiles within HBM, by bisection."""
  devices = topology_devices(topology)
  tried = {}
  while hi - lo >= step:
    mid = (lo + hi) // 2 // step * step
    c = copy.deepcopy(config)
    with c.unlocked():
      scale = mid / c.batch.seq_len
      c.batch.seq_len = mid
      for k in ("latent_capacity", "und_capacity", "vit_capacity", "ce_capacity"):
        if c.batch[k]:
          c.batch[k] = max(1, int(c.batch[k] * scale))
    try:
      compiled, _, _ = compile_step(c, devices, topology)
      tried[mid] = _memory(compiled)["total_bytes"]
      lo = mid
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      tried[mid] = "OOM"
      hi = mid
  return dict(max_seq_len=lo, tried=tried)


def main(argv: Optional[Sequence[str]] = None):
  ap = argparse.ArgumentParser(prog="bagel-aot", description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", required=True, help="experiment config file[:arg]")
  ap.add_argument("--topology", required=True, help="e.g. v5p-256, v6e-256, v5p:2x2x1")
  ap.add_argument("--num_slices", type=int, default=1)
  ap.add_argument("--out", default="", help="write the JSON report here")
  ap.add_argument("--no_extrapolate", action="store_true", help="skip the 1/2-layer compiles (memory only)")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  args = ap.parse_args(argv)
  config = load_config(args.config, args.set)
  report = analyse(config, args.topology, args.num_slices, extrapolate=not args.no_extrapolate)
  text = json.dumps(report, indent=1, default=float)
  print(summary_table([report]))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
  return report


def load_config(spec: str, overrides: Sequence[str] = ()):
  """'path/to/file.py:arg' -> ConfigDict, with 'a.b=value' overrides typed like the existing field."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("bagel_aot_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config(arg or None)
  for o in overrides:
    key, _, value = o.partition("=")
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    old = node[parts[-1]]
    node[parts[-1]] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true")
  return config


def summary_table(reports: Sequence[Dict[str, Any]]) -> str:
  head = (f"{'config':28s} {'topology':10s} {'tok/chip':>9s} {'HBM/chip GiB':>13s} {'of HBM':>7s} "
          f"{'compile s':>9s} {'MFU est.':>9s}")
  lines = [head, "-" * len(head)]
  for r in reports:
    m = r["memory_per_chip"]
    mfu = r.get("roofline", {}).get("mfu_estimate_overlapped", float("nan"))
    lines.append(f"{r['config']:28s} {r['topology']:10s} {r['tokens_per_chip']:9.0f} "
                 f"{m['total_bytes'] / 2 ** 30:13.2f} {m['fraction_of_hbm']:7.1%} {r['compile_seconds']:9.1f} "
                 f"{mfu:9.1%}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
