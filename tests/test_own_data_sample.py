"""Sampling one's model (issue #15): per-request seeds in `bagel-sample --batch`, the what-was-loaded line, and
checkpoints converted from a release that run without --tokenizer/--image-size; the converter warns when it
drops a stored ViT layer and refuses special-token ids outside the vocabulary."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import convert_fixtures as fx
from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.convert import bagel as bagel_conv
from bagel_jax.convert.cli import main as convert_main
from bagel_jax.convert.siglip import DroppedLayerWarning
from bagel_jax.inference import cli
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny("mot")
FAST = ["--num-timesteps", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("run")
  ckpt_lib.save_params(str(d / "checkpoints"), model_lib.random_params(CFG, seed=4), CFG, step=1)
  return d


def test_batch_requests_without_seed_get_their_own(ckpt, tmp_path, capsys):
  reqs = tmp_path / "reqs.jsonl"
  reqs.write_text("\n".join(json.dumps(r) for r in [
      dict(prompt="a red circle"), dict(prompt="a red circle"), dict(prompt="a red circle", seed=5)]) + "\n")
  outs = []
  for k in range(2):
    cli.sample_main(["--checkpoint", str(ckpt), "--batch", str(reqs), "--out-dir", str(tmp_path / f"o{k}"),
                     "--batch-size", "3", "--seed", "5"] + FAST)
    outs.append([np.asarray(Image.open(tmp_path / f"o{k}" / f"{i:05d}.png")) for i in range(3)])
  a, b, c = outs[0]
  assert not np.array_equal(a, b)  # the same prompt twice without a seed: two different images
  np.testing.assert_array_equal(a, c)  # request 0 gets --seed + 0 = 5, the explicit seed of request 2
  for x, y in zip(*outs):  # and a rerun reproduces every image
    np.testing.assert_array_equal(x, y)
  err = capsys.readouterr().err
  assert f"loaded {ckpt / 'checkpoints'} step 1 (raw weights)" in err
  assert "tokenizer the synthetic word vocabulary (WordTokenizer" in err and "generated 32x32" in err
  assert cli.request_seed({}, 3, 10) == 13 and cli.request_seed({"seed": 0}, 3, 10) == 0
  with pytest.raises(ValueError, match="seed must be an integer"):
    cli.request_seed({"seed": "7"}, 0, 0)


def _word_tokenizer_json(path, vocab_size):
  """A real `tokenizers` file (word level) with the fixture's special ids 1-4 and `vocab_size` entries."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<pad>": 0, **fx.TINY_SPECIALS, "<unk>": 5}
  words = "a red green blue circle square star small big of the".split()
  for w in words:
    vocab[w] = len(vocab)
  while len(vocab) < vocab_size:
    vocab[f"w{len(vocab)}"] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  d = fx.write_release(str(tmp_path_factory.mktemp("release") / "BAGEL-tiny"), tokenizer=False)
  _word_tokenizer_json(os.path.join(d, "tokenizer.json"), 64)
  return d


def test_converted_release_samples_without_extra_flags(release, tmp_path, capsys):
  dst = str(tmp_path / "ckpt")
  # the release file holds 2 ViT layers; running 1 drops a stored, trained layer: warned, naming it
  with pytest.warns(DroppedLayerWarning, match=r"stores 2 ViT layers; layer\(s\) \[1\] are not converted"):
    assert convert_main(["bagel", "--src", release, "--dst", dst, "--quiet", "--vit-layers", "1"]) == 0
  assert os.path.isfile(os.path.join(dst, bagel_conv.SOURCE_FILES, "tokenizer.json"))
  cfg = ckpt_lib.read_model_config(dst)
  side = cfg.max_latent_size * cfg.latent_downsample
  out = tmp_path / "x.png"
  cli.sample_main(["--checkpoint", dst, "--prompt", "a red circle", "--out", str(out)] + FAST)  # no other flags
  assert np.asarray(Image.open(out)).shape == (side, side, 3)
  err = capsys.readouterr().err
  assert f"tokenizer {os.path.join(dst, 'source_files', 'tokenizer.json')} (HFTokenizer, vocab 64)" in err
  assert "converted checkpoint" in err and f"generated {side}x{side}" in err
