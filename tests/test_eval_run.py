"""`bagel-eval` end to end on a saved (random-weight) tiny checkpoint: scores.json with every suite and a PNG grid,
reproducible numbers; the emergence harness walks every saved step and reports tokens to 85% of the peak."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.eval import emergence
from bagel_jax.eval import run as run_lib
from bagel_jax.eval import suites
from bagel_jax.inference import contexts as ctx_lib
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny("mot")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory as the trainer leaves it: checkpoints/ (two steps), config.json, metrics.jsonl."""
  wd = tmp_path_factory.mktemp("run")
  for step, seed in ((10, 0), (20, 1)):
    ckpt_lib.save_params(str(wd / "checkpoints"), model_lib.random_params(CFG, seed), CFG, step=step)
  (wd / "config.json").write_text(json.dumps(dict(
      data=dict(image_size=32, seed=0, num_frames=3), train=dict(log_every=5), batch=dict(batch_size=2, seq_len=128))))
  with open(wd / "metrics.jsonl", "w") as f:
    for step in (5, 10, 15, 20):
      f.write(json.dumps(dict(step=step, tokens_per_s=100.0, step_time_s=0.5, loss=1.0)) + "\n")
  return wd


def test_evaluate_writes_scores_and_grid(workdir, tmp_path):
  out = tmp_path / "eval"
  before = dict(ctx_lib.COMPILE_COUNTS)
  rep = run_lib.evaluate(str(workdir), str(out), num_samples=2, num_timesteps=3)
  assert rep["step"] == 20 and rep["weights"] == "params"
  saved = json.loads((out / run_lib.SCORES_JSON).read_text())
  assert set(saved["scores"]) == {"t2i", "vqa", "edit", "next_frame"}
  assert set(saved["suites"]["t2i"]) == set(suites.C.GENEVAL_TASKS) | {"overall"}
  for k in ("vqa", "edit", "next_frame", "vae_ceiling"):
    assert k in saved["suites"]
  assert all(0.0 <= v <= 1.0 for v in saved["scores"].values())
  assert len(saved["samples"]) == 6 * 2 + 2 + 2 + 2 and all("prompt" in s for s in saved["samples"])
  img = Image.open(out / run_lib.GRID_PNG)
  assert img.size[0] > 500 and img.size[1] > 300
  # one compiled denoising step (and VAE decoder) for every suite: fixed batch and KV capacity
  grew = {k: ctx_lib.COMPILE_COUNTS[k] - before.get(k, 0)
          for k in ("jit(euler_step)", "jit(decode_latents)", "jit(decode_step)", "jit(encode_images)")}
  assert all(v <= 1 for v in grew.values()), grew
  again = run_lib.evaluate(str(workdir), None, num_samples=2, num_timesteps=3, vae_ceiling=False)
  assert again["suites"]["t2i"] == rep["suites"]["t2i"] and again["suites"]["edit"] == rep["suites"]["edit"]
  assert again["out_dir"] == str(workdir / "eval" / "step_20")  # beside checkpoints/, not inside the Orbax root
  assert os.path.exists(workdir / "eval" / "step_20" / run_lib.SCORES_JSON)


def test_emergence_over_saved_steps(workdir, tmp_path):
  res = emergence.run_emergence(str(workdir), str(tmp_path / "em"), num_samples=2, num_timesteps=2,
                                suites=("vqa", "reason_edit"))  # the test above's shapes: nothing recompiles
  assert [r["step"] for r in res["rows"]] == [10, 20]
  # 100 tokens/s x 0.5 s x 5 steps per logged window: 250 tokens per window
  assert [r["tokens"] for r in res["rows"]] == [500.0, 1000.0] and "throughput" in res["tokens_source"]
  assert set(res["summary"]) == {"vqa", "reason_edit"}
  for f in ("emergence.json", "emergence.csv", "emergence.png"):
    assert (tmp_path / "em" / f).exists()


def test_tokens_to_85_percent_of_peak():
  f = emergence.tokens_to_fraction_of_peak
  assert f([1, 2, 3, 4], [0.1, 0.5, 0.9, 0.8]) == 3  # 0.85 x 0.9 = 0.765
  assert f([1, 2, 3], [0.0, 0.86, 1.0]) == 2
  assert f([1, 2], [0.0, 0.0]) is None
  toks, src = emergence.tokens_seen(None, [10, 20], dict(batch=dict(batch_size=2, seq_len=64)))
  assert toks == {10: 1280.0, 20: 2560.0} and "upper bound" in src


def test_bad_arguments(workdir):
  with pytest.raises(ValueError, match="unknown eval suites"):
    run_lib.evaluate_model(model_lib.from_params(model_lib.random_params(CFG), CFG), None,
                           suites.EvalSettings(num_samples=1), suites=("geneval",))
  with pytest.raises(SystemExit, match="bagel-eval: error: .*nothing_here does not exist"):
    run_lib.main(["--checkpoint", str(workdir / "nothing_here")])
  with pytest.raises(ValueError, match=r"steps \[99\] are not saved"):
    emergence.run_emergence(str(workdir), steps=[99])
  np.testing.assert_equal(model_lib.checkpoint_steps(str(workdir / "checkpoints")), [10, 20])
