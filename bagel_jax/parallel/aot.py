"""`bagel-aot`: compile the real training step for a TPU topology on this CPU host and report whether it fits
and how fast it should run. No TPU and no weights are needed (libtpu + `get_topology_desc`, abstract state).

  bagel-aot --config experiments/bagel_7b/pretrain.py:variant=mot,topology=v5p-256 --topology v5p-256 \
      [--num_slices N] [--inference] --out report.json

What XLA reports and what it does not (measured, jax 0.10.2 / libtpu 0.0.42): `memory_analysis()` is the
per-chip budget the pod will use. `cost_analysis()` counts a `scan`/`while` body once and Pallas kernels
through their `cost_estimate`, and its `optimal_seconds` is not usable for a scanned program. So the report
carries:
  (1) analytic model FLOPs (bagel_jax/train/flops.py) of a representative packed row of the stage's mix;
  (2) compiled FLOPs and bytes with loop bodies multiplied by their trip counts: the step is compiled again
      with (1, 1), (2, 1) and (1, 2) (LLM, ViT) *unrolled* layers and the CE loss unchunked (no loops left),
      and extrapolated linearly to the real depth; the attention kernels' cost estimates assume the non-empty
      tile fraction measured on the representative row (`ops.assume_tile_fraction`). The ratio to (1) is the
      recompute (remat) overhead;
  (3) a roofline step time: each segment (non-layer part, one LLM layer x depth, one ViT layer x depth) costs
      max(FLOPs / peak, bytes / HBM bandwidth) (the "overlapped" figure; the "serial" figure adds the two);
      collectives (all-gather, reduce-scatter, all-reduce, ...) are summed from the compiled HLO of the same
      variants and timed at the per-chip ICI bandwidth, reported overlapped with compute (the async
      collective flags are on) and fully exposed;
  (4) the MFU estimate (1) / (3) / peak, labelled an estimate, with its assumptions. Not a measurement.
With --inference the same is done for a denoising step (the model's forward on rows of one prompt + one noisy
1024-px latent image, velocity of every latent token) and a text decode step (one token per row against a KV
cache, through `kernels.ops.cached_attention`).

Only one process may load libtpu at a time: `main` takes the repository's libtpu file lock (the AOT tests use
the same one), so concurrent bagel-aot runs queue instead of failing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

# Per-chip facts (guide C1): bf16 peak, HBM bytes, HBM bandwidth, ICI bandwidth per chip (bidirectional, all
# links; a ring collective moves its bytes in one direction: half of it).
CHIPS = {
    "v5p": dict(peak=459e12, hbm=95 * 2 ** 30, hbm_bw=2765e9, ici_bw=1200e9),
    "v6e": dict(peak=918e12, hbm=32 * 2 ** 30, hbm_bw=1638e9, ici_bw=800e9),
    "v5e": dict(peak=197e12, hbm=16 * 2 ** 30, hbm_bw=819e9, ici_bw=400e9),
    "v4": dict(peak=275e12, hbm=32 * 2 ** 30, hbm_bw=1200e9, ici_bw=540e9),
}
HEADROOM_TARGET = 0.85  # issue #9: total per-chip memory <= 85% of HBM
_V5P_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
               512: "8x8x8"}
_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
LIBTPU_LOCK = os.path.join(tempfile.gettempdir(), "bagel_jax_libtpu.lock")
_LOCK_ENV = "BAGEL_LIBTPU_LOCK_HELD"


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


@contextlib.contextmanager
def libtpu_lock():
  """Holds the repository's libtpu file lock (re-entrant across a parent that already holds it)."""
  if os.environ.get(_LOCK_ENV):
    yield
    return
  with open(LIBTPU_LOCK, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    os.environ[_LOCK_ENV] = "1"
    try:
      yield
    finally:
      os.environ.pop(_LOCK_ENV, None)
      fcntl.flock(f, fcntl.LOCK_UN)


def topology_devices(topology: str, num_slices: int = 1):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  gen, name, _ = topology_name(topology)
  kw = dict(chip_config_name="megacore") if gen in ("v5p", "v4") else {}
  if num_slices > 1:
    kw["num_slices"] = num_slices
  return topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices


@functools.lru_cache(maxsize=None)
def _compiler_options(topology: str) -> Tuple[Tuple[Tuple[str, str], ...], Tuple[str, ...]]:
  """The overlap flags of `xla_flags` that this libtpu accepts (each probed on a trivial program), and the
  rejected ones (a flag XLA does not know fails the whole compile)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import xla_flags  # pylint: disable=import-outside-toplevel
  devices = topology_devices(topology)
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
  x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=jax.sharding.NamedSharding(mesh,
                                                                                          jax.sharding.PartitionSpec()))
  lowered = jax.jit(lambda a: a @ a).lower(x)
  ok, bad = [], []
  for k, v in xla_flags.compiler_options(topology).items():
    try:
      lowered.compile(compiler_options={k: v})
      ok.append((k, v))
    except Exception as e:  # pylint: disable=broad-except
      if "compile option" not in str(e):
        raise
      bad.append(k)
  return tuple(ok), tuple(bad)


def compiler_options(topology: str) -> Dict[str, str]:
  return dict(_compiler_options(topology)[0])


# ----------------------------------------------------------------------------------------------------------
# Representative packed row of a stage mix (for model FLOPs and the attention tile fraction).
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
  if spec.pixel_mode:  # rows laid out with latents: the same tokens (the frozen VAE encoder is not counted)
    spec = dataclasses.replace(spec, vae_image_capacity=0, vae_image_size=0)
  layout = LayoutConfig.from_model_config(model_cfg)
  if stage_ratios is None:
    try:
      from experiments.common import STAGES  # pylint: disable=import-outside-toplevel
      stage_ratios = STAGES.get(config.get("stage", ""), {}).get("ratios")
    except ImportError:  # pragma: no cover - outside the repository
      stage_ratios = None
  ratios = {k: v for k, v in (stage_ratios or dict(text=0.05, t2i=0.6, i2t=0.1, interleaved_und=0.1, video=0.1,
                                                   web=0.05)).items() if v > 0}
  # image sides as asked, but small enough that two images fit a row's capacities (tiny test configs)
  lat_side = max(1, min(gen_px // model_cfg.latent_downsample, model_cfg.max_latent_size,
                        math.isqrt(max(1, spec.latent_capacity // 2))))
  vit_side = max(1, min(und_px // model_cfg.vit.patch_size, model_cfg.vit.max_patches_per_side,
                        math.isqrt(max(1, spec.vit_capacity // 2))))
  long_text = max(8, min(1024, spec.seq_len // 4))
  c, p = model_cfg.latent_channels, model_cfg.vit.patch_dim
  vae = lambda side, noisy: VaeImage((side, side), latents=np.zeros((side * side, c), np.float32), noisy=noisy)
  vit = lambda side: VitImage(np.zeros((side * side, p), np.float32), (side, side))
  text = lambda n, loss: Text([5] * n, loss=loss)
  kinds = {
      "text": lambda: [text(long_text, True)],
      "t2i": lambda: [text(64, False), vae(lat_side, True)],
      "i2t": lambda: [vit(vit_side), text(32, False), text(64, True)],
      "interleaved_und": lambda: [vit(vit_side), text(64, False), vit(vit_side), text(128, True)],
      "video": lambda: [text(30, False), vae(lat_side // 2, False),
                        VideoGroup([vae(lat_side // 2, False) for _ in range(3)], [1, 1, 1])],
      "web": lambda: [text(128, False), vae(lat_side, False), vit(vit_side), text(256, True), vae(lat_side, True)],
  }
  order = sorted(ratios, key=lambda k: -ratios[k])
  used = {k: 0.0 for k in order}
  row = []
  blocked = set()
  for _ in range(10_000):
    open_kinds = [k for k in order if k not in blocked]
    if not open_kinds:
      break
    kind = min(open_kinds, key=lambda k: used[k] / ratios[k])  # keep the token shares close to the ratios
    s = layout_sample(kinds[kind](), layout)
    if not fits(row + [s], spec):
      blocked.add(kind)  # a smaller kind may still fit
      continue
    row.append(s)
    used[kind] += len(s)
  return assemble_batch([row], spec, layout)


def tile_fractions(row, model_cfg, block: int = 512) -> Dict[int, float]:
  """Non-empty tile fraction of the LLM row and of the ViT row of a packed batch (keyed by their lengths, for
  `ops.assume_tile_fraction`)."""
  from bagel_jax.kernels import block_tables as bt, mask as mask_lib  # pylint: disable=import-outside-toplevel

  def frac(meta):
    length = meta.document.shape[1]
    blk = min(block, -(-length // 128) * 128)
    pad = -length % blk
    meta = mask_lib.TokenMeta(*(np.pad(np.asarray(a, np.int32), ((0, 0), (0, pad))) for a in meta))
    classes = bt.tile_classes(meta, meta, blk, blk, xp=np)
    return float((classes != bt.EMPTY).mean())

  out = {}
  vit_ids = np.asarray(row["vit_image"])
  if vit_ids.shape[1]:
    out[vit_ids.shape[1]] = frac(mask_lib.TokenMeta.segments(vit_ids))
  meta = mask_lib.TokenMeta.from_row(row["document"], row["split"], row["split_mode"])
  out[int(row["document"].shape[1])] = frac(meta)  # the LLM row wins if the lengths coincide
  del model_cfg
  return out


# ----------------------------------------------------------------------------------------------------------
# Experiment: activation constraints on the embedding side of the model.
# ----------------------------------------------------------------------------------------------------------

_PATCHES: list = []


def apply_embed_constraints() -> None:
  """Historical EXPERIMENT (`--embed_constraints`), now a no-op in effect: the fix it measured is in
  models/bagel.py (`_ACT` constraints). Kept so old report commands still run. It constrains the outputs of `Bagel.embed_latents`, `embed_vit` and
  `embed_row` to ("activation_batch", "activation_length", "activation_embed"), as every decoder layer already
  constrains its input. Without them XLA's sharding propagation follows the FSDP-sharded weights of the
  timestep MLP / vae2llm / connector (embed over fsdp) and leaves the batch unsharded: the 7B PT step then
  holds the gen-expert buffer of the *global* batch, bf16[rows, NL, 3584], replicated on every chip (21 GiB
  at 128 rows, twice). This patches the model at runtime for measurement only; the fix belongs in
  models/bagel.py (three `layers.constrain` calls), after which this flag is a no-op."""
  if "embed_constraints" in _PATCHES:
    return
  from bagel_jax.models import bagel as bagel_lib, layers  # pylint: disable=import-outside-toplevel
  act = ("activation_batch", "activation_length", "activation_embed")
  cls = bagel_lib.Bagel
  orig = dict(embed_latents=cls.embed_latents, embed_vit=cls.embed_vit, embed_row=cls.embed_row)

  def wrap(fn):
    @functools.wraps(fn)
    def constrained(self, *args, **kw):
      return layers.constrain(fn(self, *args, **kw), act)
    return constrained

  for name, fn in orig.items():
    setattr(cls, name, wrap(fn))
  _PATCHES.append("embed_constraints")


# ----------------------------------------------------------------------------------------------------------
# Compile and analyse.
# ----------------------------------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.-]+\s*=\s*(\([^=]*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|"
                    r"all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)
# Per-chip link traffic of a ring collective of N bytes (N = the full, unsharded buffer), in units of N:
# all-gather and reduce-scatter move N (n-1)/n ~ N, all-reduce 2 N, permutes and all-to-all ~N.
_TRAFFIC = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0,
            "collective-permute": 1.0}


def collective_bytes(hlo_text: str) -> Dict[str, float]:
  """Bytes of the collectives in a compiled HLO module, by kind: the full (gathered / pre-scatter) buffer of
  each. TPU's reduce-scatter fusions wrap an all-reduce in an `all-reduce-scatter*` computation; those count as
  reduce-scatter. Loop bodies count once (use unrolled programs)."""
  out: Dict[str, float] = {}
  computation = ""
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = line.split()[0] if not line.startswith("ENTRY") else "ENTRY"
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    kind = m.group(2)
    if kind == "all-reduce" and "all-reduce-scatter" in computation:
      kind = "reduce-scatter"
    shapes = _SHAPE.findall(m.group(1))
    if not shapes:
      continue
    if m.group(3):  # async start: (operands..., results...): count the results half
      shapes = shapes[len(shapes) // 2:]
    n = sum(int(np.prod([int(d) for d in dims.split(",") if d])) * _BYTES[dt] for dt, dims in shapes)
    out[kind] = out.get(kind, 0.0) + float(n)
  return out


def collective_traffic(coll: Dict[str, float]) -> float:
  return sum(_TRAFFIC.get(k, 1.0) * v for k, v in coll.items())


def _memory(compiled) -> Dict[str, float]:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: float(getattr(m, f, 0) or 0) for f in fields}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                        + out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"])
  # Host memory the program uses (activations offloaded by the "offload_layer_inputs" remat policy): not HBM.
  out["host_temp_size_in_bytes"] = float(getattr(m, "host_temp_size_in_bytes", 0) or 0)
  return out


def _cost(compiled) -> Dict[str, float]:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)),
              optimal_seconds=float(c.get("optimal_seconds", float("nan"))))


def _kernels(hlo_text: str) -> list:
  return sorted({k for k in ("bagel_flash_fwd", "bagel_flash_dq", "bagel_flash_dkv") if k in hlo_text})


def compile_step(config, devices, topology: str, tile_fraction=None):
  """Lowers and compiles the jitted train step for `devices`; returns (compiled, setup, seconds)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import ops  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import trainer  # pylint: disable=import-outside-toplevel
  s = trainer.make_setup(config, devices=devices, check_data=False)
  batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.spec.abstract(),
                       rules_lib.batch_shardings(s.mesh, s.spec.abstract()))
  options = compiler_options(topology)  # probed outside the mesh context
  t0 = time.time()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules), ops.assume_tile_fraction(tile_fraction):
    lowered = s.step_fn.lower(s.abstract_state, batch)
    compiled = lowered.compile(compiler_options=options)
  return compiled, s, time.time() - t0


def _variant(config, llm_layers: int, vit_layers: int):
  """The config with this many unrolled layers and the CE unchunked: no loops left for cost analysis."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.llm_overrides = dict(num_layers=llm_layers)
    c.model.vit_layers = vit_layers
    c.model.scan_layers = False
    c.model.ce_chunk_size = 0
  return c


def is_oom(e: Exception) -> bool:
  msg = str(e).lower()
  return "resource_exhausted" in msg or "ran out of memory" in msg or "out of memory" in msg


def _segments_roofline(segments, chip) -> Dict[str, float]:
  """segments: {name: (costs dict with flops/bytes/coll per chip, multiplicity)}."""
  compute = sum(max(seg["flops"] * n / chip["peak"], seg["bytes"] * n / chip["hbm_bw"])
                for seg, n in segments.values())
  serial = sum(seg["flops"] * n / chip["peak"] + seg["bytes"] * n / chip["hbm_bw"] for seg, n in segments.values())
  flops_t = sum(seg["flops"] * n for seg, n in segments.values()) / chip["peak"]
  bytes_t = sum(seg["bytes"] * n for seg, n in segments.values()) / chip["hbm_bw"]
  comm = sum(seg["traffic"] * n for seg, n in segments.values()) / (chip["ici_bw"] / 2)
  return dict(compute_seconds=compute, compute_seconds_serial=serial, flops_seconds=flops_t,
              hbm_seconds=bytes_t, collective_seconds=comm)


def analyse(config, topology: str, num_slices: int = 1, extrapolate: bool = True,
            stage_ratios: Optional[Dict[str, float]] = None, inference: bool = False,
            variant_topology: Optional[str] = None, inference_topology: Optional[str] = None) -> Dict[str, Any]:
  """Full report for one config on one topology (see the module docstring for what each figure means)."""
  from bagel_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import trainer  # pylint: disable=import-outside-toplevel
  gen, name, _ = topology_name(topology)
  chip = CHIPS[gen]
  devices = topology_devices(topology, num_slices)
  n_dev = len(devices)
  model_cfg = trainer.build_model_config(config)
  row = representative_row(config, model_cfg, stage_ratios)
  fractions = tile_fractions(row, model_cfg)
  compiled, s, seconds = compile_step(config, devices, topology, fractions)
  mem = _memory(compiled)
  text = compiled.as_text()
  report: Dict[str, Any] = dict(
      config=config.name, stage=config.stage, topology=topology, topology_name=name, num_slices=num_slices,
      devices=n_dev, device_kind=devices[0].device_kind, compile_seconds=round(seconds, 1),
      compiler_options=compiler_options(topology),
      rejected_compiler_options=list(_compiler_options(topology)[1]),
      global_batch_rows=s.spec.batch_size, seq_len=s.spec.seq_len,
      tokens_per_chip=s.spec.batch_size * s.spec.seq_len / n_dev,
      model=dict(preset=config.model.preset, variant=s.model_cfg.llm.layer_variant,
                 attention_impl=s.model_cfg.attention_impl, remat_policy=s.model_cfg.remat_policy,
                 scan_layers=s.model_cfg.scan_layers, ce_chunk_size=s.model_cfg.ce_chunk_size,
                 dtype=s.model_cfg.dtype, param_dtype=s.model_cfg.param_dtype,
                 params=int(sum(int(np.prod(a.shape)) for a in _leaves(s.abstract_state.params))),
                 mesh=dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
                 rules=config.mesh.rules, ema=bool(s.abstract_state.ema is not None),
                 runtime_patches=list(_PATCHES)),
      memory_per_chip=dict(mem, hbm_bytes=chip["hbm"], fraction_of_hbm=mem["total_bytes"] / chip["hbm"],
                           fits_with_headroom=mem["total_bytes"] <= HEADROOM_TARGET * chip["hbm"]),
      attention=dict(kernels=_kernels(text), tile_fraction_assumed=fractions),
      largest_tensors=_largest(s),
      sharding_shortfalls=_shortfalls(s),
  )
  row_flops = flops_lib.step_flops(row, s.model_cfg)
  model_flops = row_flops["total"] * s.spec.batch_size
  report["model_flops_per_step"] = model_flops
  report["model_flops_breakdown_per_row"] = dict(row_flops)
  report["representative_row_fill"] = row_flops["tokens"] / s.spec.seq_len
  report["xla_cost_analysis_raw"] = dict(_cost(compiled), collectives=collective_bytes(text),
                                         note="scan bodies counted once: not a per-step total; optimal_seconds "
                                              "is XLA's own estimate for this (scanned) program")
  if extrapolate:
    report.update(_extrapolated(config, devices, topology, fractions, s, chip, model_flops, n_dev,
                                report["representative_row_fill"], variant_topology))
  if inference:
    itopo = inference_topology or topology
    icfg = config if itopo == topology else _per_chip_rows_config(config, n_dev, topology_name(itopo)[2])
    report["inference"] = dict(analyse_inference(icfg, itopo, 1 if itopo != topology else num_slices),
                               topology=itopo)
  return report


def _per_chip_rows_config(config, n_from: int, n_to: int):
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
    if topology_name(vtopo)[0] != topology_name(topology)[0]:
      raise ValueError(f"--variant_topology {vtopo} must be the same TPU generation as {topology}")
    vdevices = topology_devices(vtopo)
    config = _per_chip_rows_config(config, n_dev, len(vdevices))
  else:
    vdevices = devices
  for key, (nl, nv) in dict(base=(1, 1), llm2=(2, 1), vit2=(1, 2)).items():
    comp_k, _, sec = compile_step(_variant(config, nl, nv), vdevices, vtopo, fractions)
    secs += sec
    coll = collective_bytes(comp_k.as_text())
    parts[key] = dict(_cost(comp_k), coll=sum(coll.values()), traffic=collective_traffic(coll), collectives=coll)
  keys = ("flops", "bytes", "coll", "traffic")
  per_llm = {k: parts["llm2"][k] - parts["base"][k] for k in keys}
  per_vit = {k: parts["vit2"][k] - parts["base"][k] for k in keys}
  base = {k: parts["base"][k] - per_llm[k] - per_vit[k] for k in keys}
  segments = dict(base=(base, 1), llm_layers=(per_llm, lc.num_layers), vit_layers=(per_vit, vc.num_layers))
  total = {k: sum(seg[k] * n for seg, n in segments.values()) for k in keys}
  compiled_flops_total = total["flops"] * n_dev  # cost_analysis figures are per device
  rl = _segments_roofline(segments, chip)
  overlapped = max(rl["compute_seconds"], rl["collective_seconds"])
  exposed = rl["compute_seconds"] + rl["collective_seconds"]
  serial = rl["compute_seconds_serial"] + rl["collective_seconds"]
  peak_all = chip["peak"] * n_dev
  tokens = s.spec.batch_size * s.spec.seq_len
  fill = fill_fraction
  limits = dict(matmul_flops=rl["flops_seconds"], hbm_traffic=rl["hbm_seconds"],
                collectives=rl["collective_seconds"])
  return dict(
      compiled=dict(
          flops_per_step=compiled_flops_total, flops_per_chip=total["flops"], bytes_per_chip=total["bytes"],
          collective_bytes_per_chip=total["coll"], collective_link_traffic_per_chip=total["traffic"],
          recompute_ratio=compiled_flops_total / model_flops if model_flops else float("nan"), per_llm_layer=per_llm, per_vit_layer=per_vit,
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
          tokens_per_second_per_chip=tokens * fill / overlapped / n_dev,
          assumptions=("per segment (non-layer / LLM layer / ViT layer) max(FLOPs/peak, bytes/HBM-bw), "
                       "'serial' adds them; layers extrapolated from 1- and 2-layer unrolled compiles; attention "
                       "kernels costed at the representative row's non-empty tile fraction; collectives at half "
                       "the per-chip bidirectional ICI bandwidth (all-reduce counted twice), 'overlapped' hides "
                       "them behind compute, 'exposed' adds them; model FLOPs of a representative row of the "
                       "stage mix; an estimate, not a measurement")))


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


def _largest(s, n: int = 8):
  import jax  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_flatten_with_path(s.abstract_state)[0]
  leaves.sort(key=lambda kv: -int(np.prod(kv[1].shape)) * kv[1].dtype.itemsize)
  out = []
  for p, a in leaves[:n]:
    shard = a.sharding.shard_shape(a.shape) if hasattr(a.sharding, "shard_shape") else a.shape
    out.append(dict(path=jax.tree_util.keystr(p), shape=list(a.shape), dtype=str(a.dtype),
                    sharding=str(a.sharding.spec), per_chip_shape=list(shard),
                    per_chip_bytes=int(np.prod(shard)) * a.dtype.itemsize))
  return out


def _shortfalls(s, n: int = 5) -> Dict[str, Any]:
  """Parameters the rules wanted sharded further than the mesh divides (see rules.sharding_shortfalls); their
  optimizer and EMA copies follow the parameter's sharding, so the state pays the extra several times."""
  from bagel_jax.models import bagel as bagel_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
  rows = rules_lib.sharding_shortfalls(bagel_lib.param_logical_axes(s.model_cfg), s.abstract_state.params,
                                       s.mesh, s.rules)
  return dict(count=len(rows), extra_param_bytes_per_chip=int(sum(r[-1] for r in rows)),
              largest=[dict(path=p, shape=list(shape), wanted=str(w), got=str(g), extra_bytes_per_chip=int(b))
                       for p, shape, w, g, b in rows[:n]])


# ----------------------------------------------------------------------------------------------------------
# Inference: a denoising step and a decode step.
# ----------------------------------------------------------------------------------------------------------

def _inference_params(model_cfg, mesh, rules, dtype):
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.models import bagel as bagel_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
  abstract = bagel_lib.abstract_params(model_cfg)
  shardings = rules_lib.logical_to_sharding(bagel_lib.param_logical_axes(model_cfg), abstract, mesh, rules)
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sh), abstract, shardings)


def denoise_batch(model_cfg, rows: int, prompt: int = 64, px: int = 1024):
  """Rows of one prompt + one noisy `px` latent image each (what a sampler's step recomputes without a cache)."""
  from bagel_jax.batch import BatchSpec  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.sequence import LayoutConfig, Text, VaeImage, assemble_batch, layout_sample  # pylint: disable=import-outside-toplevel
  side = min(px // model_cfg.latent_downsample, model_cfg.max_latent_size)
  layout = LayoutConfig.from_model_config(model_cfg)
  sample = layout_sample([Text([5] * prompt), VaeImage((side, side), latents=np.zeros(
      (side * side, model_cfg.latent_channels), np.float32), noisy=True)], layout)
  length = -(-len(sample) // 128) * 128
  spec = BatchSpec(batch_size=1, seq_len=length, vit_capacity=0, latent_capacity=side * side, image_capacity=1,
                   vit_patch_dim=model_cfg.vit.patch_dim, latent_dim=model_cfg.latent_channels,
                   latent_downsample=model_cfg.latent_downsample)
  one = assemble_batch([[sample]], spec, layout)
  return dataclasses.replace(spec, batch_size=rows), one


def _denoise_fn(model_cfg):
  import jax  # pylint: disable=import-outside-toplevel
  from bagel_jax.models import bagel as bagel_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.models.routing import take_rows  # pylint: disable=import-outside-toplevel

  def velocity(module, batch):
    t = jax.nn.sigmoid(batch["latent_t_logit"])
    emb = module.embed_latents(batch["latent_x0"].astype(model_cfg.dtype), t, batch["latent_pos"])
    h, _ = module.hidden_states(batch, emb)
    return module.velocity(take_rows(h, batch["latent_dest"]))

  def step(params, batch):
    return bagel_lib.Bagel(model_cfg).apply({"params": params}, batch, method=velocity)

  return step


def _rms(x, w, eps):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x32 = x.astype(jnp.float32)
  return (x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)) * w).astype(x.dtype)


def decode_weights_abstract(model_cfg, dtype, sharding):
  """Und-expert decoder weights stacked over layers (what text decoding reads), as ShapeDtypeStructs."""
  import jax  # pylint: disable=import-outside-toplevel
  lc = model_cfg.llm
  d, h, kv, dh, f, n = lc.hidden_size, lc.num_heads, lc.num_kv_heads, lc.head_dim, lc.intermediate_size, lc.num_layers
  shapes = dict(wq=(n, d, h * dh), bq=(n, h * dh), wk=(n, d, kv * dh), bk=(n, kv * dh), wv=(n, d, kv * dh),
                bv=(n, kv * dh), wo=(n, h * dh, d), wg=(n, d, f), wu=(n, d, f), wd=(n, f, d), ln1=(n, d), ln2=(n, d),
                qn=(n, dh), kn=(n, dh))
  out = {k: jax.ShapeDtypeStruct(v, dtype, sharding=sharding) for k, v in shapes.items()}
  out["final_norm"] = jax.ShapeDtypeStruct((d,), dtype, sharding=sharding)
  out["lm_head"] = jax.ShapeDtypeStruct((d, lc.vocab_size), dtype, sharding=sharding)
  return out


def _decode_fn(model_cfg):
  """One decoding step: x [B, 1, D] (embedded token) through every layer against the cache, logits out.
  Mirrors the Qwen2 layer (RMSNorm, QK-norm, RoPE omitted: elementwise) with the cached Pallas attention."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bagel_jax.kernels import mask as mask_lib, ops  # pylint: disable=import-outside-toplevel
  lc = model_cfg.llm
  h_, kv_, dh, eps = lc.num_heads, lc.num_kv_heads, lc.head_dim, lc.rms_norm_eps

  def step(w, x, k_cache, v_cache, q_meta, cache_meta):
    b = x.shape[0]
    qm = mask_lib.TokenMeta(*q_meta)
    cm = mask_lib.TokenMeta(*cache_meta)

    def layer(hid, xs):
      lw, kc, vc = xs
      hn = _rms(hid, lw["ln1"], eps)
      q = (hn @ lw["wq"] + lw["bq"]).reshape(b, 1, h_, dh)
      k = (hn @ lw["wk"] + lw["bk"]).reshape(b, 1, kv_, dh)
      v = (hn @ lw["wv"] + lw["bv"]).reshape(b, 1, kv_, dh)
      q, k = _rms(q, lw["qn"], eps), _rms(k, lw["kn"], eps)
      o = ops.cached_attention(q, k, v, qm, kc, vc, cm)
      hid = hid + o.reshape(b, 1, h_ * dh) @ lw["wo"]
      hn = _rms(hid, lw["ln2"], eps)
      hid = hid + (jax.nn.silu(hn @ lw["wg"]) * (hn @ lw["wu"])) @ lw["wd"]
      return hid, (k, v)

    layer_w = {k: v for k, v in w.items() if k not in ("final_norm", "lm_head")}
    hid, new_kv = jax.lax.scan(layer, x, (layer_w, k_cache, v_cache))
    logits = jnp.einsum("bld,dv->blv", _rms(hid, w["final_norm"], eps), w["lm_head"],
                        preferred_element_type=jnp.float32)
    return logits, new_kv

  return step


def analyse_inference(config, topology: str, num_slices: int = 1, cache_len: int = 8192, px: int = 1024,
                      rows_per_chip: int = 1) -> Dict[str, Any]:
  """Denoise and decode steps on the config's mesh, bf16 weights. Denoise: FSDP-sharded weights as in
  training (the model's forward, both experts); decode: und-expert weights replicated on every chip, rows
  sharded over all chips (plain data-parallel serving), KV cache of `cache_len` tokens per row."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from bagel_jax.parallel import mesh as mesh_lib, rules as rules_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import flops as flops_lib, trainer  # pylint: disable=import-outside-toplevel
  gen, _, _ = topology_name(topology)
  chip = CHIPS[gen]
  devices = topology_devices(topology, num_slices)
  n_dev = len(devices)
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "none"
  model_cfg = trainer.build_model_config(c)
  mesh = mesh_lib.create_mesh(dict(c.mesh.ici), dict(c.mesh.dcn), devices)
  rules = rules_lib.rules_for_mesh(rules_lib.get_rules(c.mesh.rules), mesh)
  options = compiler_options(topology)
  out: Dict[str, Any] = {}

  def finish(name, compiled, seconds, model_flops, tokens):
    mem = _memory(compiled)
    cost = _cost(compiled)
    text = compiled.as_text()
    coll = collective_bytes(text)
    t_compute = max(cost["flops"] / chip["peak"], cost["bytes"] / chip["hbm_bw"])
    t_comm = collective_traffic(coll) / (chip["ici_bw"] / 2)
    step_t = max(t_compute, t_comm)
    out[name] = dict(
        compile_seconds=round(seconds, 1), memory_per_chip=dict(mem, hbm_bytes=chip["hbm"],
                                                                fraction_of_hbm=mem["total_bytes"] / chip["hbm"]),
        xla_flops_per_chip=cost["flops"], xla_bytes_per_chip=cost["bytes"], collectives=coll,
        model_flops_per_step=model_flops, tokens_per_step=tokens, kernels=_kernels(text),
        roofline=dict(step_seconds=step_t, compute_seconds=t_compute, collective_seconds=t_comm,
                      limited_by="hbm" if cost["bytes"] / chip["hbm_bw"] > cost["flops"] / chip["peak"] else "flops",
                      mfu_estimate=model_flops / (step_t * chip["peak"] * n_dev) if step_t else float("nan")))

  # Denoise: the model's forward over prompt + noisy image rows (scan body counted once: the FLOPs/bytes are
  # scaled by the layer count for the layer part via a 1-layer variant).
  rows = n_dev * rows_per_chip
  spec, one = denoise_batch(model_cfg, rows, px=px)
  batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), spec.abstract(),
                       rules_lib.batch_shardings(mesh, spec.abstract()))
  fl = flops_lib.step_flops(one, model_cfg)
  fwd_flops = (fl["llm_matmul"] + fl["llm_attention"] + fl["latent_io"]) / 3 * rows
  params = _inference_params(model_cfg, mesh, rules, jnp.bfloat16)
  frac = tile_fractions(one, model_cfg)

  def compile_denoise(cfg):
    p = _inference_params(cfg, mesh, rules, jnp.bfloat16)
    from bagel_jax.kernels import ops  # pylint: disable=import-outside-toplevel
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), ops.assume_tile_fraction(frac):
      t0 = time.time()
      comp = jax.jit(_denoise_fn(cfg)).lower(p, batch).compile(compiler_options=options)
    return comp, time.time() - t0

  compiled, sec = compile_denoise(model_cfg)
  one_layer, _ = compile_denoise(dataclasses.replace(model_cfg, scan_layers=False).replace_llm(num_layers=1))
  two_layer, _ = compile_denoise(dataclasses.replace(model_cfg, scan_layers=False).replace_llm(num_layers=2))
  finish("denoise_step", compiled, sec, fwd_flops, int(fl["tokens"]) * rows)
  c1, c2 = _cost(one_layer), _cost(two_layer)
  n = model_cfg.llm.num_layers
  flops = c1["flops"] + (n - 1) * (c2["flops"] - c1["flops"])
  byts = c1["bytes"] + (n - 1) * (c2["bytes"] - c1["bytes"])
  coll = collective_traffic(collective_bytes(one_layer.as_text())) + (n - 1) * (
      collective_traffic(collective_bytes(two_layer.as_text())) - collective_traffic(collective_bytes(one_layer.as_text())))
  t_compute = max(flops / chip["peak"], byts / chip["hbm_bw"])
  t_comm = coll / (chip["ici_bw"] / 2)
  step_t = max(t_compute, t_comm)
  out["denoise_step"].update(
      xla_flops_per_chip_extrapolated=flops, xla_bytes_per_chip_extrapolated=byts,
      roofline=dict(step_seconds=step_t, compute_seconds=t_compute, collective_seconds=t_comm,
                    limited_by=max(dict(flops=flops / chip["peak"], hbm=byts / chip["hbm_bw"], ici=t_comm).items(),
                                   key=lambda kv: kv[1])[0],
                    mfu_estimate=fwd_flops / (step_t * chip["peak"] * n_dev),
                    images_per_second_per_chip=rows_per_chip / step_t,
                    note="layers extrapolated from 1/2-layer unrolled compiles; weights FSDP-sharded as in "
                         "training, so every step all-gathers them"),
      image_px=px, rows=rows)
  del params

  # Decode: replicated und weights, rows over every device.
  lc = model_cfg.llm
  dmesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("data",))
  rep = NamedSharding(dmesh, P())
  rows_spec = NamedSharding(dmesh, P("data"))
  cache_spec = NamedSharding(dmesh, P(None, "data"))
  w = decode_weights_abstract(model_cfg, jnp.bfloat16, rep)
  x = jax.ShapeDtypeStruct((rows, 1, lc.hidden_size), jnp.bfloat16, sharding=rows_spec)
  kc = jax.ShapeDtypeStruct((lc.num_layers, rows, cache_len, lc.num_kv_heads, lc.head_dim), jnp.bfloat16,
                            sharding=cache_spec)
  qm = tuple(jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rows_spec) for _ in range(4))
  cm = tuple(jax.ShapeDtypeStruct((rows, cache_len), jnp.int32, sharding=rows_spec) for _ in range(4))
  with jax.set_mesh(dmesh):
    t0 = time.time()
    compiled = jax.jit(_decode_fn(model_cfg)).lower(w, x, kc, kc, qm, cm).compile(compiler_options=options)
    sec = time.time() - t0
  per_tok = 2 * (flops_lib._llm_layer_params(model_cfg) * lc.num_layers + lc.hidden_size * lc.vocab_size)  # pylint: disable=protected-access
  attn = 4 * lc.num_heads * lc.head_dim * cache_len * lc.num_layers
  finish("decode_step", compiled, sec, (per_tok + attn) * rows, rows)
  # the scanned layer body is counted once by XLA: scale its share analytically (weights + cache per layer)
  weight_bytes = sum(int(np.prod(a.shape)) * 2 for a in jax.tree.leaves(w))
  cache_bytes = 2 * lc.num_layers * (rows // n_dev) * cache_len * lc.num_kv_heads * lc.head_dim * 2
  t_hbm = (weight_bytes + cache_bytes) / chip["hbm_bw"]
  t_flops = (per_tok + attn) * rows / n_dev / chip["peak"]
  out["decode_step"].update(
      cache_len=cache_len, rows=rows,
      roofline=dict(step_seconds=max(t_hbm, t_flops), hbm_seconds=t_hbm, compute_seconds=t_flops,
                    limited_by="hbm" if t_hbm > t_flops else "flops",
                    tokens_per_second_per_chip=(rows / n_dev) / max(t_hbm, t_flops),
                    mfu_estimate=t_flops / max(t_hbm, t_flops),
                    note="analytic: every step reads the und-expert weights and the row's KV cache once (XLA "
                         "counts the scanned layer once); batch 1 row per chip"))
  out["decode_step"]["weights_bytes_per_chip"] = weight_bytes
  return out


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
  gen, _, _ = topology_name(topology)
  hbm = CHIPS[gen]["hbm"]
  devices = topology_devices(topology)
  tried = {}
  lo, hi = lo // step * step, -(-hi // step) * step
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    try:
      compiled, _, _ = compile_step(scale_batch(config, mid), devices, topology)
      total = _memory(compiled)["total_bytes"]
      tried[mid] = total / 2 ** 30
      ok = total <= budget * hbm
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      tried[mid] = "OOM"
      ok = False
    lo, hi = (mid, hi) if ok else (lo, mid)
  return dict(max_seq_len=lo, budget_fraction=budget, tried_gib=tried)


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------

REPORT_KEYS = ("config", "stage", "topology", "topology_name", "num_slices", "devices", "device_kind",
               "compile_seconds", "global_batch_rows", "seq_len", "tokens_per_chip", "model", "memory_per_chip",
               "attention", "largest_tensors", "model_flops_per_step", "xla_cost_analysis_raw")
MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "total_bytes", "hbm_bytes", "fraction_of_hbm", "fits_with_headroom")
ROOFLINE_KEYS = ("step_seconds_overlapped", "step_seconds_exposed", "mfu_estimate_overlapped",
                 "mfu_estimate_exposed", "limited_by", "assumptions")


def check_report(report: Dict[str, Any]) -> None:
  """Raises ValueError naming the first missing key of the documented JSON schema."""
  def need(d, keys, where):
    for k in keys:
      if k not in d:
        raise ValueError(f"bagel-aot report: missing {where}{k}")
  need(report, REPORT_KEYS, "")
  need(report["memory_per_chip"], MEMORY_KEYS, "memory_per_chip.")
  if "roofline" in report:
    need(report["roofline"], ROOFLINE_KEYS, "roofline.")
    need(report, ("compiled",), "")
    need(report["compiled"], ("flops_per_step", "bytes_per_chip", "recompute_ratio", "collective_bytes_per_chip"),
         "compiled.")
  if "inference" in report:
    need(report["inference"], ("denoise_step", "decode_step"), "inference.")


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
  head = (f"{'config':24s} {'variant':8s} {'topology':9s} {'tok/chip':>8s} {'GiB/chip':>8s} {'of HBM':>7s} "
          f"{'compile s':>9s} {'recompute':>9s} {'MFU ovl':>8s} {'MFU exp':>8s} {'limit':>11s}")
  lines = [head, "-" * len(head)]
  for r in reports:
    m = r["memory_per_chip"]
    rl = r.get("roofline", {})
    rc = r.get("compiled", {}).get("recompute_ratio", float("nan"))
    lines.append(f"{r['config']:24s} {r.get('model', {}).get('variant', '?'):8s} {r['topology']:9s} "
                 f"{r['tokens_per_chip']:8.0f} {m['total_bytes'] / 2 ** 30:8.2f} {m['fraction_of_hbm']:7.1%} "
                 f"{r['compile_seconds']:9.1f} {rc:9.2f} {rl.get('mfu_estimate_overlapped', float('nan')):8.1%} "
                 f"{rl.get('mfu_estimate_exposed', float('nan')):8.1%} {rl.get('limited_by', '-'):>11s}")
  return "\n".join(lines)


def markdown_table(reports: Sequence[Dict[str, Any]]) -> str:
  """The docs table: one line per report ("*" marks runtime patches, see `apply_embed_constraints`)."""
  head = ("| config | variant | topology | mesh (data x fsdp), remat | tokens/chip | GiB/chip (args + temps) | "
          "of HBM | fits <= 85% | compile s | recompute | MFU est. (overlapped / exposed) | limited by |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    m = r["memory_per_chip"]
    rl = r.get("roofline")
    rc = r.get("compiled", {}).get("recompute_ratio")
    model = r.get("model", {})
    name = r["config"] + (" *" if model.get("runtime_patches") else "")
    mesh = model.get("mesh", {})
    layout = (f"{mesh.get('data', 1) * mesh.get('dcn_data', 1)} x {mesh.get('fsdp', '?')}, "
              f"{model.get('remat_policy', '?')}" + (f", CE chunk {model['ce_chunk_size']}"
                                                     if model.get("ce_chunk_size", 4096) != 4096 else ""))
    cells = [name, model.get("variant", "?"), r["topology"], layout, f"{r['tokens_per_chip']:,.0f}",
             f"{m['total_bytes'] / 2 ** 30:.1f} ({m['argument_size_in_bytes'] / 2 ** 30:.1f} + "
             f"{m['temp_size_in_bytes'] / 2 ** 30:.1f})", f"{m['fraction_of_hbm']:.1%}",
             "yes" if m["fraction_of_hbm"] <= HEADROOM_TARGET else "no", f"{r['compile_seconds']:.0f}",
             f"{rc:.2f}" if rc is not None else "-",
             f"{rl['mfu_estimate_overlapped']:.1%} / {rl['mfu_estimate_exposed']:.1%}" if rl else "-",
             rl["limited_by"] if rl else "-"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def collect(paths: Sequence[str]) -> Dict[str, Any]:
  """Several bagel-aot reports -> one document {reports: [...], table: markdown}."""
  reports = []
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    check_report(r)
    r["source"] = os.path.basename(p)
    reports.append(r)
  return dict(reports=reports, table_markdown=markdown_table(reports))


def main(argv: Optional[Sequence[str]] = None):
  ap = argparse.ArgumentParser(prog="bagel-aot", description=__doc__.split("\n\n")[0])
  ap.add_argument("--collect", nargs="+", default=None,
                  help="merge existing report JSONs into --out (no compile) and print the markdown table")
  ap.add_argument("--config", help="experiment config file[:arg]")
  ap.add_argument("--topology", help="e.g. v5p-256, v6e-256, v5p:2x2x1")
  ap.add_argument("--num_slices", type=int, default=1)
  ap.add_argument("--out", default="", help="write the JSON report here")
  ap.add_argument("--no_extrapolate", action="store_true", help="skip the 1/2-layer compiles (memory only)")
  ap.add_argument("--inference", action="store_true", help="also compile a denoising and a decode step")
  ap.add_argument("--max_seq_len", default="", help="lo,hi: also bisect the largest fitting row length")
  ap.add_argument("--variant_topology", default="",
                  help="compile the 1/2-layer FLOPs variants on this smaller slice of the same generation, with "
                       "the same rows per chip (much faster to compile for pod-sized topologies)")
  ap.add_argument("--inference_topology", default="", help="slice for --inference (default: --topology)")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  ap.add_argument("--embed_constraints", action="store_true",
                  help="EXPERIMENT: constrain the embedding-side activations to batch sharding (see "
                       "apply_embed_constraints); recorded in the report as model.runtime_patches")
  args = ap.parse_args(argv)
  if args.collect:
    doc = collect(args.collect)
    print(doc["table_markdown"])
    if args.out:
      with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=float)
    return doc
  if not args.config or not args.topology:
    ap.error("--config and --topology are required (or --collect)")
  if args.embed_constraints:
    apply_embed_constraints()
  config = load_config(args.config, args.set)
  old_slices = int(config.mesh.dcn.get("data", 1))
  if args.num_slices != old_slices:  # data parallel across slices: rows per slice stay as configured
    with config.unlocked():
      config.mesh.dcn.data = args.num_slices
      config.batch.batch_size = config.batch.batch_size // old_slices * args.num_slices
  with libtpu_lock():
    report = analyse(config, args.topology, args.num_slices, extrapolate=not args.no_extrapolate,
                     inference=args.inference, variant_topology=args.variant_topology or None,
                     inference_topology=args.inference_topology or None)
    if args.max_seq_len:
      lo, hi = (int(x) for x in args.max_seq_len.split(","))
      report["max_fitting"] = max_fitting_seq_len(config, args.topology, lo, hi)
  check_report(report)
  print(summary_table([report]))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, default=float)
  return report


if __name__ == "__main__":
  main()
