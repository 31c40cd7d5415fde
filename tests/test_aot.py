"""`bagel-aot`: the train step AOT-compiles for real TPU topologies on this CPU host (libtpu, no TPU) with the
Pallas attention, fits in HBM, and the report has its documented schema.

AOT cases run `bagel-aot` in a subprocess with JAX_PLATFORMS unset, under the libtpu file lock shared with
tests/test_attention_aot.py (only one process may load libtpu at a time: never run these concurrently).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from bagel_jax.aot import costs, hlo, report as report_lib, rows as rows_lib
from bagel_jax.parallel import topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed: AOT compilation for TPU "
                                                          "topologies needs it (pip install 'jax[tpu]')")
TINY = "experiments/tiny/random_smoke.py:batch=4,seq=512"
PALLAS = ["model.attention_impl=pallas", "model.dtype=bfloat16"]


def run_aot(tmp_path, config, topology, *flags, overrides=()):
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  cmd = [sys.executable, "-m", "bagel_jax.aot", "--config", config, "--topology", topology, "--out", str(out),
         *flags]
  cmd += [f"--config.{o}" for o in list(PALLAS) + list(overrides)]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000, check=False)
  assert r.returncode == 0 and out.exists(), f"bagel-aot failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n" \
                                             f"{r.stderr[-6000:]}"
  report = json.loads(out.read_text())
  report_lib.check_report(report)
  return report, r.stdout


def _check_fits(report, device_kind):
  assert report["device_kind"].startswith(device_kind), report["device_kind"]
  m = report["memory_per_chip"]
  assert 0 < m["total_bytes"] < m["hbm_bytes"], m
  assert report["attention"]["kernels"] == ["bagel_flash_dkv", "bagel_flash_dq", "bagel_flash_fwd"], report
  assert report["model"]["attention_impl"] == "pallas"


# ----------------------------------------------------------------------------------------------------------
# No libtpu needed.
# ----------------------------------------------------------------------------------------------------------

def test_topology_names():
  assert topology.parse("v5p-256") == ("v5p", "v5p:4x4x8", 128)
  assert topology.parse("v5p-128") == ("v5p", "v5p:4x4x4", 64)
  assert topology.parse("v6e-256") == ("v6e", "v6e:16x16", 256)
  assert topology.parse("v5e-16") == ("v5e", "v5e:4x4", 16)
  assert topology.parse("v5litepod-16") == ("v5e", "v5e:4x4", 16)
  assert topology.parse("v5p:2x2x1") == ("v5p", "v5p:2x2x1", 4)
  assert topology.chip_count("v4-128") == 64 and topology.chip_count("v6e-8") == 8
  for bad in ("v7x-9", "v5p-3", "v6e-1000", "v5p:axb"):
    with pytest.raises(ValueError, match="topology"):
      topology.parse(bad)


def test_chip_facts_are_read_from_one_table():
  """The trainer's MFU, the XLA flags and the AOT roofline read the same per-chip table."""
  from bagel_jax.parallel import xla_flags
  from bagel_jax.train import flops as flops_lib
  assert topology.peak_flops("TPU v5p") == topology.CHIPS["v5p"].peak_flops == 459e12
  assert topology.peak_flops("TPU v5 lite") == 197e12 and topology.peak_flops("TPU v6 lite") == 918e12
  assert topology.peak_flops("cpu") == 0.0 and topology.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops_lib.peak_flops is topology.peak_flops and xla_flags.generation is topology.generation


def test_compiler_effort_is_checked_before_libtpu_loads():
  from bagel_jax.aot import libtpu
  assert libtpu.CHECK_EFFORT in libtpu.EFFORTS and "default" in libtpu.EFFORTS
  with pytest.raises(ValueError, match="effort='O9'"):
    libtpu.compiler_options("v5p:2x2x1", "O9")


def test_aot_package_is_imported_only_by_clis():
  """Layering: bagel_jax.aot is a tool (layer 6); no module of the package outside it imports it, except CLIs."""
  import ast
  pkg = os.path.join(REPO, "bagel_jax")
  offenders = []
  for root, _, files in os.walk(pkg):
    if os.path.join(pkg, "aot") in root:
      continue
    for name in files:
      if not name.endswith(".py") or name in ("cli.py", "__main__.py"):
        continue
      path = os.path.join(root, name)
      for node in ast.walk(ast.parse(open(path).read())):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) else [])
        if any(m == "bagel_jax.aot" or m.startswith("bagel_jax.aot.") for m in mods):
          offenders.append(os.path.relpath(path, REPO))
  assert not offenders, offenders


def _cpu_program():
  """A CPU-compiled program with a 7-trip fori_loop (a matmul and a tanh per trip) and a 3x3 convolution."""
  import jax
  import jax.numpy as jnp

  def f(x, w, k):
    y = jax.lax.fori_loop(0, 7, lambda i, c: jnp.tanh(c @ w) + i, x)
    return y.sum() + jax.lax.conv_general_dilated(k, k[:, :, :3, :3], (1, 1), "SAME").sum()

  return jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((16, 16)), jnp.ones((2, 4, 9, 9))).compile()


def test_hlo_counts_agree_with_xla_and_multiply_loop_bodies():
  """Counted with every loop body once, the instruction rules give XLA's own cost analysis exactly (dot,
  convolution over its valid window positions, elementwise, reductions); counted per execution, the loop body
  runs its 7 trips, read from the backend config or, without it, from the loop condition and counter."""
  compiled = _cpu_program()
  xla = costs.cost(compiled)
  transcendentals = compiled.cost_analysis()["transcendentals"]
  text = compiled.as_text()
  once = hlo.analyse(text, count_trips=False)
  assert once.total["mxu_flops"] + once.total["vpu_flops"] == xla["flops"]
  assert once.total["transcendentals"] == transcendentals
  assert once.total["hbm_bytes"] == pytest.approx(xla["bytes"], rel=0.02)
  # [2, 9, 9, 4] x [3, 3, 4, 2] 'SAME': per spatial dim 9 x 3 (output, kernel) pairs less 2 that read padding
  conv = 2 * (2 * 4 * 2) * 25 * 25
  for variant in (text, re.sub(r',?"known_trip_count":\{"n":"7"\}', "", text)):
    run = hlo.analyse(variant)
    (loop,) = run.loops
    assert loop.trips == 7 and loop.per_iteration["mxu_flops"] == 2 * 8 * 16 * 16
    assert run.total["mxu_flops"] == 7 * 2 * 8 * 16 * 16 + once.total["mxu_flops"] - 2 * 8 * 16 * 16
    assert run.total["transcendentals"] == 7 * 8 * 16 and run.unknown_trips == 0
  assert once.total["mxu_flops"] - 2 * 8 * 16 * 16 == conv


TPU_HLO = """HloModule m, is_scheduled=true

%all-reduce-scatter.1.clone (input.18: bf16[64,2,16]) -> bf16[64,2,16] {
  %input.18 = bf16[64,2,16]{2,1,0} parameter(0)
  ROOT %all-reduce.5 = bf16[64,2,16]{2,1,0} all-reduce(%input.18), channel_id=1, to_apply=%add
}

%fused_step (param_0.1: s32[], param_1.1: s32[]) -> s32[] {
  %param_0.1 = s32[] parameter(0)
  %param_1.1 = s32[] parameter(1)
  ROOT %add.3 = s32[] add(%param_0.1, %param_1.1)
}

%body (p.1: (s32[], bf16[64,2,16])) -> (s32[], bf16[64,2,16]) {
  %p.1 = (s32[]{:T(128)}, bf16[64,2,16]{2,1,0}) parameter(0)
  %i.1 = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} fusion(%i.1, %one), kind=kLoop, calls=%fused_step
  %x.1 = bf16[64,2,16]{2,1,0} get-tuple-element(%p.1), index=1
  %rs = bf16[64,2,16]{2,1,0} fusion(%x.1), kind=kCustom, calls=%all-reduce-scatter.1.clone
  ROOT %t.1 = (s32[]{:T(128)}, bf16[64,2,16]{2,1,0}) tuple(%next, %rs)
}

%cond (p.2: (s32[], bf16[64,2,16])) -> pred[] {
  %p.2 = (s32[]{:T(128)}, bf16[64,2,16]{2,1,0}) parameter(0)
  %i.2 = s32[]{:T(128)} get-tuple-element(%p.2), index=0
  %n = s32[]{:T(128)} constant(28)
  ROOT %lt = pred[]{:T(512)} compare(%i.2, %n), direction=LT
}

ENTRY %main (p: bf16[8,64], x: bf16[64,2,16]) -> f32[] {
  %param_0.8633 = bf16[8,64]{1,0} parameter(0)
  %x = bf16[64,2,16]{2,1,0} parameter(1)
  %all-gather.708 = bf16[32,64]{1,0:T(8,128)(2,1)} all-gather(%param_0.8633), dimensions={0}
  %a = f32[64]{0} constant({...})
  %all-reduce.356 = (f32[64]{0}, f32[64]{0}) all-reduce(%a, %a), channel_id=416
  %collective-permute-start.1 = (f32[4]{0}, f32[4]{0}) collective-permute-start(%a), channel_id=2
  %zero = s32[]{:T(128)} constant(0)
  %init = (s32[]{:T(128)}, bf16[64,2,16]{2,1,0}) tuple(%zero, %x)
  %loop = (s32[]{:T(128)}, bf16[64,2,16]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_read_from_tpu_hlo_per_execution():
  """Collective buffers by kind (an all-reduce inside TPU's all-reduce-scatter fusion is a reduce-scatter;
  an async start counts its results half), each x the trips of the loop it is in (the counter is stepped by a
  fusion here, as TPU compiles it)."""
  run = hlo.analyse(TPU_HLO)
  got = {k.split("/", 1)[1]: v for k, v in run.total.items() if k.startswith("collective/")}
  assert got == {"reduce-scatter": 28 * 64 * 2 * 16 * 2, "all-gather": 32 * 64 * 2, "all-reduce": 2 * 64 * 4,
                 "collective-permute": 16}
  assert [l.trips for l in run.loops] == [28]
  assert costs.collective_traffic(got) == got["reduce-scatter"] + got["all-gather"] + 2 * got["all-reduce"] + 16


def test_representative_rows_follow_the_stage_mix():
  """The 7B PT rows the AOT report counts model FLOPs on: packed by the real packer from the PT mix, sparse
  in tiles (most of the [L, L] tile grid is empty)."""
  from bagel_jax.train import config as train_config
  from experiments.bagel_7b import pretrain
  config = pretrain.get_config("variant=mot,topology=v5p-256")
  model_cfg = train_config.model_config(config)
  rows = rows_lib.representative_rows(config, model_cfg, 4)
  assert rows["document"].shape == (4, config.batch.seq_len)
  assert (rows["latent_image"] > 0).sum() > 0 and (rows["vit_image"] > 0).sum() > 0
  fractions = rows_lib.tile_fractions(rows)
  assert set(fractions) == {config.batch.seq_len, config.batch.vit_capacity}
  assert all(0 < f < 0.5 for f in fractions.values()), fractions


def test_report_schema_check():
  report = {k: 0 for k in report_lib.REPORT_KEYS}
  report["memory_per_chip"] = {k: 0 for k in report_lib.MEMORY_KEYS}
  report["compiled"] = {k: 0 for k in report_lib.COMPILED_KEYS}
  report["roofline"] = {k: 0 for k in report_lib.ROOFLINE_KEYS}
  report_lib.check_report(report)
  del report["memory_per_chip"]["total_bytes"]
  with pytest.raises(ValueError, match="memory_per_chip.total_bytes"):
    report_lib.check_report(report)


# ----------------------------------------------------------------------------------------------------------
# libtpu AOT compiles.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.smoke
@needs_libtpu
def test_tiny_train_step_compiles_for_v5p(tmp_path):
  """The default-run representative: the tiny preset's real train step (Pallas attention in the LLM and the
  ViT, MoT routing, Adam, EMA) for a v5p 2x2x1 slice; its loops found and counted."""
  report, stdout = run_aot(tmp_path, TINY, "v5p:2x2x1")
  _check_fits(report, "TPU v5")
  assert "GiB/chip" in stdout
  assert report["largest_tensors"] and "sharding" in report["largest_tensors"][0]
  comp = report["compiled"]
  assert comp["loops"] and comp["loops_with_unknown_trip_count"] == 0, comp
  assert comp["check_against_xla"]["ratio"] == pytest.approx(1.0, abs=0.01), comp["check_against_xla"]


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("preset,topology,kind", [("tiny", "v6e:2x2", "TPU v6"), ("small", "v5p:2x2x1", "TPU v5"),
                                                  ("small", "v6e:2x2", "TPU v6")])
def test_train_step_compiles_with_full_report(tmp_path, preset, topology, kind):
  overrides = [] if preset == "tiny" else [
      "model.preset=small", "batch.seq_len=2048", "batch.vit_capacity=512", "batch.latent_capacity=1024",
      "batch.image_capacity=64"]
  report, _ = run_aot(tmp_path, TINY, topology, overrides=overrides)
  _check_fits(report, kind)
  rl, comp = report["roofline"], report["compiled"]
  assert 0 < rl["mfu_estimate_exposed"] <= rl["mfu_estimate_overlapped"] < rl["mfu_upper_bound_compute_only"] <= 1
  assert rl["mfu_upper_bound_compute_only"] == pytest.approx(1 / comp["recompute_ratio"], rel=1e-6), (rl, comp)
  assert comp["check_against_xla"]["ratio"] == pytest.approx(1.0, abs=0.01), comp["check_against_xla"]
  assert comp["loops_with_unknown_trip_count"] == 0 and comp["matmul_flops_per_chip"] > 0
  if preset == "small":
    # executed >= model FLOPs. Model FLOPs count the packer rows' tokens (here ~51% of the row: the latent
    # capacity binds), the step computes the whole row; per filled token the excess is the kernel's backward
    # recompute, tile granularity (512 x 512) and head_dim 64 padded to 128 lanes. (The tiny preset's 16-wide
    # heads and 1-tile rows inflate it ~20x.)
    fill = report["representative_row_fill"]
    assert 0.2 < fill < 1.0, report["representative_rows"]
    assert comp["recompute_ratio"] > 1 / fill and 1.0 < comp["recompute_ratio"] * fill < 3.0, (fill, comp)


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_rematerialised_forward_is_counted(tmp_path):
  """The scanned step with remat recomputes each layer's forward inside the backward loop. Counted from the
  program that runs, the backward loop does (3 - D F / P) x the forward loop's matmuls (two gradients plus the
  recompute of every matmul but the MLP's down projection, whose output the gradients do not need; P = the
  layer's matmul parameters), 2x without remat, exactly. The earlier 1-/2-layer unrolled copies let the
  compiler merge the recompute into the forward and missed most of it (6.59e13 vs 7.70e13 FLOPs per 7B layer)."""
  from bagel_jax.models import config as config_lib
  from bagel_jax.train import flops as flops_lib
  base = ["model.preset=small", "batch.seq_len=1024", "batch.vit_capacity=256", "batch.latent_capacity=512",
          "batch.image_capacity=32"]
  remat, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", overrides=base + ["model.remat_policy=nothing_saveable"])
  plain, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", overrides=base + ["model.remat_policy=none"])
  cfg = config_lib.small("mot")
  recompute = 1 - cfg.llm.hidden_size * cfg.llm.intermediate_size / flops_lib.llm_layer_params(cfg)
  assert remat["model_flops_per_step"] == plain["model_flops_per_step"]
  for report, ratio in ((remat, 2 + recompute), (plain, 2.0)):
    loops = [l for l in report["compiled"]["loops"] if l["label"].endswith("/llm")]
    fwd = next(l for l in loops if "transpose(" not in l["label"])
    bwd = next(l for l in loops if "transpose(" in l["label"])
    assert fwd["trips"] == bwd["trips"] == cfg.llm.num_layers
    assert bwd["matmul_flops"] / fwd["matmul_flops"] == pytest.approx(ratio, rel=1e-3), (ratio, loops)
  # the recompute is in the per-step total: one more LLM forward (less the down projections) and attention
  llm_forward = remat["model_flops_breakdown_per_row"]["llm_matmul"] / 3 * remat["global_batch_rows"]
  extra = remat["compiled"]["flops_per_step"] - plain["compiled"]["flops_per_step"]
  assert extra >= recompute * llm_forward, (extra, recompute * llm_forward)


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_check_effort_keeps_the_memory_and_flop_figures(tmp_path):
  """AOT checks compile at XLA effort O0 (libtpu.CHECK_EFFORT: 81 s instead of 320 s for the 7B PT step): the
  per-chip memory and the executed FLOPs they report must be those of the default-effort program a launch
  compiles, within what the compiler's choices move (measured: <= 2% here and on the 7B rows)."""
  base = ["model.preset=small", "batch.seq_len=2048", "batch.vit_capacity=512", "batch.latent_capacity=1024",
          "batch.image_capacity=64"]
  quick, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", overrides=base)
  full, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", "--effort=default", overrides=base)
  assert (quick["compiler_effort"], full["compiler_effort"]) == ("O0", "default")
  assert quick["compiler_options"]["xla_optimization_level"] == "EFFORT_O0"
  assert "xla_optimization_level" not in full["compiler_options"]
  m0, m1 = quick["memory_per_chip"], full["memory_per_chip"]
  assert m0["argument_size_in_bytes"] == m1["argument_size_in_bytes"], (m0, m1)
  assert m0["total_bytes"] == pytest.approx(m1["total_bytes"], rel=0.03), (m0, m1)
  f0, f1 = quick["compiled"]["flops_per_step"], full["compiled"]["flops_per_step"]
  assert f0 == pytest.approx(f1, rel=0.02), (f0, f1)
  assert quick["model_flops_per_step"] == full["model_flops_per_step"]


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_inference_steps_compile(tmp_path):
  report, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", "--inference")
  inf = report["inference"]
  for step in ("denoise_step", "decode_step"):
    assert inf[step]["memory_per_chip"]["fraction_of_hbm"] < 1, inf[step]
    assert inf[step]["roofline"]["step_seconds"] > 0, inf[step]
  assert inf["denoise_step"]["kernels"] == ["bagel_flash_fwd"]
  assert inf["decode_step"]["kernels"] == ["bagel_flash_fwd"]


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_offloaded_layer_inputs_live_in_host_memory(tmp_path):
  """The "offload_layer_inputs" remat policy (what fits the 7B PT step on v6e-256): the compiled step keeps each
  decoder layer's input in host memory (pinned_host) between forward and backward, and HBM temps shrink where
  those inputs are a large share of them (at 7B: 28 x 36,864 x 3,584 bf16 = 7 GiB per chip).

  32 layers: the offloaded step pays ~0.2 GiB of its own (a peeled loop iteration, transfer buffers), which
  hides the saving of the 8-layer preset's 96 MiB stack (8 layers: 2,012 -> 2,096 MiB)."""
  layers = 32
  config = "experiments/tiny/random_smoke.py:batch=4,seq=512,layers=%d" % layers
  base = ["model.preset=small", "batch.seq_len=8192", "batch.vit_capacity=2048", "batch.latent_capacity=4096",
          "batch.image_capacity=64"]
  saved, _ = run_aot(tmp_path, config, "v6e:2x2", overrides=base + ["model.remat_policy=nothing_saveable"])
  offload, _ = run_aot(tmp_path, config, "v6e:2x2", overrides=base + ["model.remat_policy=offload_layer_inputs"])
  m0, m1 = saved["memory_per_chip"], offload["memory_per_chip"]
  stack = layers * 1 * 8192 * 768 * 2  # one row per chip, hidden 768, bf16
  assert m0["host_temp_size_in_bytes"] == 0 and m1["host_temp_size_in_bytes"] >= stack, (m0, m1)
  assert m1["temp_size_in_bytes"] < m0["temp_size_in_bytes"], (m0, m1)
