"""`bagel-sample` and `bagel-chat` on a saved tiny checkpoint: single requests, JSONL batch mode (results do not
depend on batching: each request's noise comes from its own seed), think mode and an edit."""
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.data import synthetic as S
from bagel_jax.inference import cli
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny("mot")
FAST = ["--num-timesteps", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("run")
  ckpt_lib.save_params(str(d / "checkpoints"), model_lib.random_params(CFG, seed=4), CFG, step=1)
  img = S.render(S.Scene((S.Obj("square", "blue", (0.5, 0.5), 0.3),)), 32)
  Image.fromarray(img).save(d / "src.png")
  return d


def test_sample_single_and_batch(ckpt, tmp_path, capsys):
  out = tmp_path / "one.png"
  cli.sample_main(["--checkpoint", str(ckpt), "--prompt", "a red circle", "--seed", "3", "--out", str(out),
                   "--max-think-tokens", "3"] + FAST)
  single = np.asarray(Image.open(out))
  assert single.shape == (32, 32, 3)
  reqs = tmp_path / "reqs.jsonl"
  reqs.write_text("\n".join(json.dumps(r) for r in [
      dict(prompt="two green stars", seed=1), dict(prompt="a red circle", seed=3, out="circle.png"),
      dict(prompt="make the blue square red", image=str(ckpt / "src.png"), seed=2),
      dict(prompt="a red circle", think=True, seed=3)]) + "\n")
  cli.sample_main(["--checkpoint", str(ckpt), "--batch", str(reqs), "--out-dir", str(tmp_path / "o"),
                   "--batch-size", "2", "--max-think-tokens", "3"] + FAST)
  rows = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
  assert [r["out"] for r in rows] == ["00000.png", "circle.png", "00002.png", "00003.png"]
  assert rows[3]["think"] is not None and rows[0]["think"] is None
  # same prompt and seed, batched with another request: the same image as the single run
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "circle.png")), single)
  assert np.asarray(Image.open(tmp_path / "o" / "00002.png")).shape == (32, 32, 3)


def test_chat_single_batch_and_interactive(ckpt, tmp_path, capsys, monkeypatch):
  src = str(ckpt / "src.png")
  cli.chat_main(["--checkpoint", str(ckpt), "--image", src, "--question", "what color is the square ?",
                 "--max-new-tokens", "3"])
  first = capsys.readouterr().out.strip()
  reqs = tmp_path / "q.jsonl"
  reqs.write_text("\n".join(json.dumps(r) for r in [
      dict(image=src, question="what color is the square ?"), dict(question="how many objects are there ?")]))
  cli.chat_main(["--checkpoint", str(ckpt), "--batch", str(reqs), "--out", str(tmp_path / "a.jsonl"),
                 "--max-new-tokens", "3"])
  answers = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
  assert len(answers) == 2 and answers[0]["answer"] == first  # greedy: batch mode gives the single answer
  monkeypatch.setattr(sys, "stdin", io.StringIO("what color is the square ?\nwhat shape is it ?\n\n"))
  cli.chat_main(["--checkpoint", str(ckpt), "--image", src, "--max-new-tokens", "3", "--capacity", "128"])
  assert len(capsys.readouterr().out.strip().splitlines()) == 2
