"""Bad input fails early with a message naming the problem: a non-image file, an image smaller than one patch,
an empty prompt, a checkpoint of a different config, a mismatched tokenizer, impossible image sizes, bad
guidance settings; the command lines turn these into one-line errors."""
import json

import numpy as np
import pytest
from PIL import Image

from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.data import tokenizer as tok_lib
from bagel_jax.inference import cli
from bagel_jax.inference import inferencer as inf
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny("mot")
# A failed Orbax restore (the mismatched checkpoint below) leaves reads that are garbage-collected later.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt") / "checkpoints"
  ckpt_lib.save_params(str(d), model_lib.random_params(CFG), CFG, step=3)
  return str(d)


@pytest.fixture(scope="module")
def model():
  return model_lib.from_params(model_lib.random_params(CFG), CFG)


@pytest.fixture
def files(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
  (tmp_path / "notes.png").write_text("this is not an image")
  Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "ok.png")
  return tmp_path


def test_images(model, files):
  with pytest.raises(ValueError, match="notes.png is not an image file"):
    inf.prepare_image(model, files / "notes.png")
  with pytest.raises(ValueError, match=r"4x4 px, smaller than one patch"):
    inf.prepare_image(model, files / "tiny.png")
  with pytest.raises(FileNotFoundError, match="no such file"):
    inf.prepare_image(model, files / "missing.png")
  with pytest.raises(ValueError, match="uint8"):
    inf.prepare_image(model, np.zeros((32, 32, 3), np.float32))
  assert inf.prepare_image(model, files / "ok.png").latent_grid == (4, 4)


def test_prompts_sizes_and_guidance(model):
  s = inf.Session(model, 1, 64)
  for bad in ("", "   "):
    with pytest.raises(ValueError, match="prompt is empty"):
      s.add_text([bad])
  with pytest.raises(ValueError, match="multiple of 8 px"):
    s.image_size(30, 32)
  with pytest.raises(ValueError, match="max_latent_size"):
    s.image_size(256, 256)
  with pytest.raises(ValueError, match="cfg_renorm_type"):
    inf.GenerationConfig(cfg_renorm_type="local").check()
  with pytest.raises(ValueError, match="cfg_interval"):
    inf.GenerationConfig(cfg_interval=(0.8, 0.2)).check()
  with pytest.raises(ValueError, match="2 values for a batch of 1"):
    s.add_text(["a", "b"])


def test_checkpoints(ckpt, tmp_path):
  m = model_lib.load_model(ckpt, expect=config_lib.tiny("mot"))
  assert m.step == 3 and m.item == "params"
  with pytest.raises(ValueError, match=r"different model config.*layer_variant"):
    model_lib.load_model(ckpt, expect=config_lib.tiny("dense"))
  with pytest.raises(FileNotFoundError, match="neither a bagel-jax checkpoint"):
    model_lib.load_model(str(tmp_path))
  # model_config.json edited to another architecture than the stored arrays
  bad = tmp_path / "bad"
  ckpt_lib.save_params(str(bad), model_lib.random_params(CFG), CFG, step=1)
  other = config_lib.tiny("mot").replace_llm(hidden_size=32)
  ckpt_lib.write_model_config(str(bad), other)
  with pytest.raises(ValueError, match="do not match the model config"):
    model_lib.load_model(str(bad))


def test_tokenizer_mismatch(tmp_path):
  toks = list(tok_lib.WordTokenizer.load().tokens)
  cfg = CFG.replace_llm(eos_token_id=7)
  with pytest.raises(ValueError, match="special tokens .* do not match"):
    model_lib.check_tokenizer(tok_lib.WordTokenizer(toks), cfg)
  with pytest.raises(ValueError, match="embedding has only"):
    model_lib.check_tokenizer(tok_lib.WordTokenizer(toks), CFG.replace_llm(vocab_size=100))


def test_cli_errors_are_one_line(ckpt, files, capsys):
  cases = [
      (cli.sample_main, ["--prompt", " "], "prompt is empty"),
      (cli.sample_main, ["--prompt", "x", "--image", str(files / "notes.png")], "is not an image file"),
      (cli.sample_main, ["--prompt", "x", "--image", str(files / "tiny.png")], "smaller than one patch"),
      (cli.sample_main, ["--prompt", "x", "--expect-preset", "tiny", "--expect-variant", "dense"],
       "different model config"),
      (cli.chat_main, ["--image", str(files / "notes.png"), "--question", "what ?"], "is not an image file"),
      (cli.chat_main, ["--question", ""], "question is empty"),
  ]
  for main, argv, msg in cases:
    with pytest.raises(SystemExit) as e:
      main(["--checkpoint", ckpt] + argv)
    assert msg in str(e.value) and str(e.value).count("\n") == 0, (argv, str(e.value))
  jsonl = files / "reqs.jsonl"
  jsonl.write_text(json.dumps({"prompt": "a red circle"}) + "\n" + "{not json\n")
  with pytest.raises(SystemExit, match=r"reqs.jsonl:2: not valid JSON"):
    cli.sample_main(["--checkpoint", ckpt, "--batch", str(jsonl)])
