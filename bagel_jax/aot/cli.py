"""bagel-aot: compile the real training step for a TPU topology on this CPU host and report whether it fits
and how fast it should run. No TPU and no weights are needed.

  bagel-aot --config experiments/bagel_7b/pretrain.py:variant=mot,topology=v5p-256 [--topology v5p-256] \
      [--config.model.remat_policy=...] [--num_slices N] [--inference] [--max_seq_len LO,HI] --out report.json
  bagel-aot --collect a.json,b.json --out merged.json      # merge reports, print the markdown table

The config file is loaded with `ml_collections.config_flags` (as bagel-train does) and locked, so a mistyped
`--config.x=y` override fails naming the key. --topology defaults to the config's `topology`. The compile holds
the repository's libtpu lock (`bagel_jax.aot.libtpu`): concurrent runs queue.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from bagel_jax.aot import inference as inference_lib
from bagel_jax.aot import libtpu, report as report_lib, training
from bagel_jax.parallel import topology as topology_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice, e.g. v5p-256, v6e-256, v5p:2x2x1 (default: the "
                                "config's `topology`)")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices (data parallel over DCN; rows per slice stay)")
_OUT = flags.DEFINE_string("out", "", "write the JSON report here")
_INFERENCE = flags.DEFINE_bool("inference", False, "also compile a denoising and a decode step")
_MAX_SEQ_LEN = flags.DEFINE_string("max_seq_len", "", "LO,HI: also bisect the largest fitting row length")
_EFFORT = flags.DEFINE_enum("effort", libtpu.CHECK_EFFORT, libtpu.EFFORTS,
                            "XLA optimisation effort of the compiles: O0 compiles fastest with the same per-chip "
                            "memory and FLOPs (docs/tpu_aot.md); 'default' is what a training launch compiles")
_INFERENCE_TOPOLOGY = flags.DEFINE_string("inference_topology", "", "slice for --inference (default: --topology)")
_COLLECT = flags.DEFINE_list("collect", [], "merge these report JSONs into --out (no compile) and print the "
                             "markdown table")

PROG = "bagel-aot"


def _fail(message: str):
  print(f"{PROG}: error: {message}\nRun `{PROG} --help` for usage.", file=sys.stderr, flush=True)
  sys.exit(2)


def _write(path: str, doc) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(doc, f, indent=1, default=float)


def with_slices(config, num_slices: int):
  """Data parallel across `num_slices` slices: the rows per slice stay as configured."""
  old = int(config.mesh.dcn.get("data", 1))
  if num_slices != old:
    config.mesh.dcn.data = num_slices
    config.batch.batch_size = config.batch.batch_size // old * num_slices
  return config


def run(config, topology: str, num_slices: int = 1, *, inference: bool = False, max_seq_len: str = "",
        inference_topology: str = "", effort: str = libtpu.CHECK_EFFORT):
  """The full report (under the libtpu lock)."""
  config = with_slices(config, num_slices)
  n_dev = topology_lib.chip_count(topology) * num_slices
  with libtpu.libtpu_lock():
    report = training.analyse(config, topology, num_slices, effort=effort)
    if inference:
      itopo = inference_topology or topology
      same = itopo == topology
      icfg = config if same else training.per_chip_rows_config(config, n_dev, topology_lib.chip_count(itopo))
      report["inference"] = dict(inference_lib.analyse_inference(icfg, itopo, num_slices if same else 1,
                                                                 effort=effort),
                                 topology=itopo)
    if max_seq_len:
      lo, hi = (int(x) for x in max_seq_len.split(","))
      report["max_fitting"] = training.max_fitting_seq_len(config, topology, lo, hi, effort=effort)
  report_lib.check_report(report)
  return report


def main(argv: Optional[Sequence[str]] = None):
  argv = list(sys.argv if argv is None else [PROG, *argv])
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(flags.FLAGS.module_help(__name__))
    return None
  try:
    flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.keys()  # a config file that failed to load reports only when first used
  except Exception as e:  # pylint: disable=broad-except  # config files raise anything; all are usage errors
    _fail(" ".join(str(e).split()))
  if _COLLECT.value:
    doc = report_lib.collect(_COLLECT.value)
    print(doc["table_markdown"])
    if _OUT.value:
      _write(_OUT.value, doc)
    return doc
  if config is None:
    _fail("--config is required (or --collect)")
  topology = _TOPOLOGY.value or config.get("topology", "")
  if not topology:
    _fail("--topology is required: the config names no `topology`")
  try:
    topology_lib.parse(topology)
  except ValueError as e:
    _fail(f"--topology: {e}")
  report = run(config, topology, _NUM_SLICES.value, inference=_INFERENCE.value, max_seq_len=_MAX_SEQ_LEN.value,
               inference_topology=_INFERENCE_TOPOLOGY.value, effort=_EFFORT.value)
  print(report_lib.summary_table([report]))
  if _OUT.value:
    _write(_OUT.value, report)
  return report


if __name__ == "__main__":
  main()
