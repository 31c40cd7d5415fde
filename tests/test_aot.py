"""`bagel-aot`: the train step AOT-compiles for real TPU topologies on this CPU host (libtpu, no TPU) with the
Pallas attention, fits in HBM, and the report has its documented schema.

AOT cases run `bagel-aot` in a subprocess with JAX_PLATFORMS unset, under the libtpu file lock shared with
tests/test_attention_aot.py (only one process may load libtpu at a time: never run these concurrently).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bagel_jax.aot import report as report_lib, rows as rows_lib
from bagel_jax.aot import costs
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


def test_collective_bytes_reads_tpu_hlo():
  hlo = "\n".join([
      "%all-reduce-scatter.1.clone (input.18: bf16[64,2,16]) -> bf16[16,2,16] {",
      "  %all-reduce.5 = bf16[64,2,16]{2,1,0} all-reduce(%input.18), channel_id=1, to_apply=%add",
      "}",
      "ENTRY %main (p: bf16[8,64]) -> f32[] {",
      "  %all-gather.708 = bf16[32,64]{1,0:T(8,128)(2,1)} all-gather(%param_0.8633), dimensions={0}",
      "  %all-reduce.356 = (f32[64]{0}, f32[64]{0}) all-reduce(%a, %b), channel_id=416",
      "  %collective-permute-start.1 = (f32[4]{0}, f32[4]{0}) collective-permute-start(%x), channel_id=2",
      "  ROOT %r = f32[] constant(0)",
      "}",
  ])
  got = costs.collective_bytes(hlo)
  assert got == {"reduce-scatter": 64 * 2 * 16 * 2, "all-gather": 32 * 64 * 2, "all-reduce": 2 * 64 * 4,
                 "collective-permute": 16}
  assert costs.collective_traffic(got) == got["reduce-scatter"] + got["all-gather"] + 2 * got["all-reduce"] + 16


def test_representative_row_follows_the_stage_mix():
  from bagel_jax.train import trainer
  from experiments.bagel_7b import pretrain
  config = pretrain.get_config("variant=mot,topology=v5p-256")
  model_cfg = trainer.build_model_config(config)
  row = rows_lib.representative_row(config, model_cfg)
  assert row["document"].shape == (1, config.batch.seq_len)
  assert (row["document"] > 0).mean() > 0.9  # packed nearly full
  fractions = rows_lib.tile_fractions(row)
  assert set(fractions) == {config.batch.seq_len, config.batch.vit_capacity}
  assert all(0 < f < 0.5 for f in fractions.values()), fractions  # block-sparse: most tiles are empty


def test_report_schema_check():
  report = {k: 0 for k in report_lib.REPORT_KEYS}
  report["memory_per_chip"] = {k: 0 for k in report_lib.MEMORY_KEYS}
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
  ViT, MoT routing, Adam, EMA) for a v5p 2x2x1 slice, memory only."""
  report, stdout = run_aot(tmp_path, TINY, "v5p:2x2x1", "--no_extrapolate")
  _check_fits(report, "TPU v5")
  assert "GiB/chip" in stdout
  assert report["largest_tensors"] and "sharding" in report["largest_tensors"][0]


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
  assert 0 < rl["mfu_estimate_exposed"] <= rl["mfu_estimate_overlapped"] < 1, rl
  assert comp["per_llm_layer"]["flops"] > 0 and comp["per_vit_layer"]["flops"] > 0, comp
  if preset == "small":
    # compiled >= model FLOPs; the excess is the kernel's backward recompute, tile granularity (512 x 512) and
    # head_dim 64 padded to 128 lanes. (The tiny preset's 16-wide heads and 1-tile rows inflate it ~20x.)
    assert 1.0 < comp["recompute_ratio"] < 3.0, comp


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_extrapolation_matches_an_unrolled_compile(tmp_path):
  """Cross-check of the 1/2-layer extrapolation: for the small preset with every layer unrolled (no loops,
  so XLA's cost analysis is exact) the extrapolated FLOPs and bytes equal XLA's totals within 2%."""
  overrides = ["model.preset=small", "model.scan_layers=False", "model.ce_chunk_size=0", "batch.seq_len=1024",
               "batch.vit_capacity=256", "batch.latent_capacity=512", "batch.image_capacity=32"]
  report, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", overrides=overrides)
  raw, comp = report["xla_cost_analysis_raw"], report["compiled"]
  assert comp["flops_per_chip"] == pytest.approx(raw["flops"], rel=0.02), (raw, comp)
  assert comp["bytes_per_chip"] == pytest.approx(raw["bytes"], rel=0.05), (raw, comp)


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_inference_steps_compile(tmp_path):
  report, _ = run_aot(tmp_path, TINY, "v5p:2x2x1", "--no_extrapolate", "--inference")
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
  decoder layer's input in host memory (pinned_host) between forward and backward, and HBM temps shrink."""
  # (measured at these sizes: temps 2,215 -> 2,055 MiB, host_temp 0 -> 96 MiB; ~15 min for both compiles)
  base = ["model.preset=small", "batch.seq_len=8192", "batch.vit_capacity=2048", "batch.latent_capacity=4096",
          "batch.image_capacity=64"]
  saved, _ = run_aot(tmp_path, TINY, "v6e:2x2", "--no_extrapolate",
                     overrides=base + ["model.remat_policy=nothing_saveable"])
  offload, _ = run_aot(tmp_path, TINY, "v6e:2x2", "--no_extrapolate",
                       overrides=base + ["model.remat_policy=offload_layer_inputs"])
  m0, m1 = saved["memory_per_chip"], offload["memory_per_chip"]
  assert m0["host_temp_size_in_bytes"] == 0 < m1["host_temp_size_in_bytes"], (m0, m1)
  assert m1["temp_size_in_bytes"] < m0["temp_size_in_bytes"], (m0, m1)
