"""Tokenizers: the shipped synthetic word vocabulary and a Qwen-style tokenizer.json (built here, never
downloaded); image transforms: the official resize rule, patch order, decode errors."""
import io

import numpy as np
import pytest
from PIL import Image

from bagel_jax.data import build_vocab, synthetic, transforms as tf
from bagel_jax.layout import SpecialTokens
from bagel_jax.data.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from bagel_jax.models.config import TINY_SPECIAL_IDS, tiny

QWEN = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|vision_end|>": 151653}


def test_word_vocab_is_committed_up_to_date_and_fits_tiny():
  tok = WordTokenizer.load()
  assert tok.tokens == build_vocab.build()  # regenerate with `python -m bagel_jax.data.build_vocab`
  assert tok.vocab_size <= tiny().llm.vocab_size == 512
  assert tok.tokens[:5] == ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
  s = tok.special
  assert (s.bos, s.eos, s.vision_start, s.vision_end) == tuple(TINY_SPECIAL_IDS.values()) == (1, 2, 3, 4)


def test_word_tokenizer_covers_templates_and_roundtrips():
  tok = WordTokenizer.load()
  for task in synthetic.TASKS:
    src = synthetic.SyntheticSource(task, "test", 50)
    for i in range(50):
      for text in src[i]["texts"]:
        ids = tok.encode(text)
        assert ids and tok.unk not in ids and min(ids) >= 6, text  # no specials/padding inside texts
        assert tok.decode(ids) == text
  # unknown words are spelled, not dropped; unknown symbols become <unk>
  ids = tok.encode("a zebra!")
  assert tok.decode(ids) == "a zebra <unk>" and tok.ids["z"] in ids and tok.ids["##e"] in ids
  assert tok.encode("<|im_start|>") != [1]  # special strings in text are not special tokens


def test_hf_tokenizer_from_local_json(tmp_path):
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  vocab = {"[UNK]": 0, "a": 1, "red": 2, "circle": 3, **QWEN}
  t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens([AddedToken(k, special=True) for k in QWEN])
  path = str(tmp_path / "tokenizer.json")
  t.save(path)
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer)
  assert tok.special == SpecialTokens(151644, 151645, 151652, 151653)
  assert tok.encode("a red circle") == [1, 2, 3]  # no special tokens added: the layout adds them
  assert tok.decode([1, 2, 151645]) == "a red"
  import pickle
  assert pickle.loads(pickle.dumps(tok)).encode("red") == [2]  # picklable for Grain worker processes
  del vocab["<|vision_end|>"]
  t2 = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  t2.save(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="vision_end"):
    HFTokenizer(str(tmp_path / "bad.json"))
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    HFTokenizer(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, rule, img_num, want", [
    # scale = min(980/1000, 1) = 0.98; short edge 500*0.98 = 490 >= 378 -> 980 x 490 (multiples of 14)
    ((1000, 500), (980, 378, 14, 10 ** 9), 1, (980, 490)),
    # small image: scaled up so the short edge reaches 378: 100x200 -> 378 x 756
    ((100, 200), (980, 378, 14, 10 ** 9), 1, (378, 756)),
    # VAE side: stride 16, (512, 1024): 640x480 -> short 480 < 512 -> scale 512/480: 683->688, 512
    ((640, 480), (1024, 512, 16, 10 ** 9), 1, (688, 512)),
    # max_pixels / img_num, applied as the official code does (area ratio used as the side scale)
    ((224, 224), (980, 224, 14, 224 * 224), 2, (112, 112)),
    # long edge capped after rounding
    ((3000, 10), (980, 10, 14, 10 ** 9), 1, (980, 14)),
])
def test_official_resize_rule(size, rule, img_num, want):
  got = tf.target_size(*size, tf.ResizeRule(*rule), img_num)
  assert got == want
  assert got[0] % rule[2] == 0 and got[1] % rule[2] == 0


def test_vit_patch_order_matches_siglip_and_rows_cols_channels():
  from bagel_jax.models.siglip import patchify
  px = np.random.default_rng(0).uniform(-1, 1, (24, 16, 3)).astype(np.float32)
  got, grid = tf.vit_patches(px, 8)
  np.testing.assert_array_equal(got, patchify(px, 8))
  assert grid == (3, 2) and got.shape == (6, 192)
  # token 1 is the patch at (row 0, col 1); inside it, (r, c, channel) order
  np.testing.assert_array_equal(got[1].reshape(8, 8, 3), px[0:8, 8:16])


def test_vae_side_sizes_are_multiples_of_latent_downsample():
  cfg = tiny()
  from bagel_jax.data.samples import default_transforms
  t = default_transforms(cfg, gen_size=(32, 64), und_size=(32, 64))
  for w, h in ((37, 91), (64, 64), (200, 30), (9, 9)):
    px, grid = t.vae_image(Image.new("RGB", (w, h)))
    assert px.shape[0] % cfg.latent_downsample == 0 and px.shape[1] % cfg.latent_downsample == 0
    assert grid == (px.shape[0] // 8, px.shape[1] // 8) and max(px.shape[:2]) <= 64
  with pytest.raises(ValueError, match="max_latent_size"):
    default_transforms(cfg, gen_size=(32, 256))


def test_decode_errors_are_skip_reasons():
  img = synthetic.render(synthetic.t2i_scene(np.random.default_rng(0), "two"), 32)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG")
  data = buf.getvalue()
  assert tf.decode(data).size == (32, 32)
  with pytest.raises(tf.SkipSample) as e:
    tf.decode(data[: len(data) // 2])  # truncated JPEG
  assert e.value.reason == "decode_error"
  with pytest.raises(tf.SkipSample) as e:
    tf.decode(b"not an image")
  assert e.value.reason == "decode_error"
  with pytest.raises(tf.SkipSample) as e:
    tf.decode(np.zeros((4, 4), np.float32))
  assert e.value.reason == "bad_field"
  rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
  assert np.all(np.asarray(tf.decode(rgba)) == 255)  # transparency on white
