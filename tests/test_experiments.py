"""Experiment configs parse for both sizes, the runner plans sweeps, and re-running an experiment with the same
seed reproduces its curves CSV byte for byte."""
import os

import numpy as np
import pytest

from experiments import report, run
from experiments.ablation import dense, moe, moe_topk, mot
from experiments.data_ratio import gen_und
from experiments.demo import search as demo_search
from experiments.lr_sweep import lr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [dense, moe, mot, moe_topk])
def test_ablation_variants_differ_only_in_the_variant(module):
  ref = mot.get_config("size=tiny").to_dict()
  c = module.get_config("size=tiny").to_dict()
  assert c["model"]["variant"] == module.__name__.rsplit(".", 1)[-1]
  for key in ("batch", "optim", "loss", "data", "train"):
    assert c[key] == ref[key], key
  big = module.get_config("size=1.5b,topology=v6e-256")
  assert big.model.preset == "bagel_1_5b" and big.train.steps == 10_000 and big.data.gen_und == 4.0
  assert big.batch.batch_size == 256 and big.optim.lr == 1e-4


def test_sweep_configs_and_bad_args():
  assert gen_und.get_config("gen=2").data.gen_und == 2.0
  assert gen_und.get_config("size=1.5b,gen=1").train.steps == 16_000
  assert lr.get_config("lr_index=6,size=1.5b").optim.lr == pytest.approx(1.73e-4)
  assert lr.get_config("lr_index=0").optim.lr == pytest.approx(4.3e-4)  # tiny: x10, same spread
  with pytest.raises(ValueError, match="lr_index"):
    lr.get_config("lr_index=7")
  with pytest.raises(ValueError, match="size"):
    mot.get_config("size=7b")
  with pytest.raises(ValueError, match="unknown key 'colour'"):
    mot.get_config("colour=red")


def test_demo_search_config_builds_the_run_it_names():
  from bagel_jax.data.config import DataConfig  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import config as train_config  # pylint: disable=import-outside-toplevel
  c = demo_search.get_config("hidden=128,layers=4,inter=512,single=True,bs=2,steps=4000")
  srcs = DataConfig.from_config(c.data).sources
  assert {s.task: s.variants for s in srcs} == {"t2i": ("single",), "vqa": ()}
  m = train_config.model_config(c)
  assert (m.llm.hidden_size, m.llm.num_layers, m.llm.intermediate_size) == (128, 4, 512)
  assert c.data.gen_und == 0.0 and DataConfig.from_config(c.data).weights() == {"t2i": 1.0, "vqa": 1.0}
  assert c.batch.batch_size == 2 and c.train.steps == 4000 and c.optim.total_steps == 4000
  with pytest.raises(ValueError, match="all 0"):
    demo_search.get_config("t2i=0,vqa=0")
  with pytest.raises(ValueError, match="layers"):
    demo_search.get_config("layers=0")


def test_plan_labels_and_tpu_commands():
  runs = run.plan(["experiments/lr_sweep/lr.py"], run.parse_grid(["lr_index=0,6"]), [0, 1], "size=tiny")
  assert [r["label"] for r in runs] == ["lr_index0"] * 2 + ["lr_index6"] * 2
  assert runs[1]["arg"] == "size=tiny,lr_index=0,seed=1" and runs[1]["workdir"] == "lr_index0/seed1"
  cmds = run.tpu_commands(runs[:1], "gs://b/lr", "abl", "v6e-256", 0)
  assert cmds[0][-4:] == ["--config", "experiments/lr_sweep/lr.py:size=tiny,lr_index=0,seed=0", "--workdir",
                          "gs://b/lr/lr_index0/seed0"]


def test_report_statistics_on_known_numbers(tmp_path):
  """Paired t-test and final-window means on hand-made curves."""
  def fake(level):
    return {"step": np.arange(10, 110, 10), "ce": np.full(10, level), "mse": np.linspace(1, level, 10)}
  groups = {"a": [fake(0.5), fake(0.52), fake(0.49)], "b": [fake(0.6), fake(0.61), fake(0.63)]}
  s = report.summarize(groups, reference="b")
  assert s["final"]["a"]["ce"]["mean"] == pytest.approx(0.5033, abs=1e-4)
  d = s["paired_vs_reference"]["a"]["ce"]
  assert d["mean"] == pytest.approx(-0.11, abs=1e-6) and 0.01 < d["p"] < 0.05  # diffs -.10, -.09, -.14
  ok, detail = report.significant_less(s, "a", "b", "mse")
  assert ok and "significant" in detail


@pytest.mark.slow
def test_rerun_reproduces_the_csv_exactly(tmp_path):
  csvs = []
  for i in range(2):
    out = tmp_path / f"results{i}"
    run.main(["--configs", os.path.join(REPO, "experiments/ablation/mot.py"), "--seeds", "0", "--steps", "12",
              "--workdir-root", str(tmp_path / f"runs{i}"), "--results", str(out)])
    csvs.append((out / "curves.csv").read_bytes())
    assert (out / "REPORT.md").exists() and (out / "curves.png").exists()
  assert csvs[0] == csvs[1] and len(csvs[0]) > 100
