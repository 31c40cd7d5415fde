"""The high-level inference API follows the official inferencer's context rules (text -> gen and cfg_img, image ->
gen only, think text -> gen only), edits generate at the source's size, seeds make results reproducible, and
generated images can be re-inserted as context (interleaved continuation). Shapes are kept to batch 1-2 and KV
capacity 128, which the CLI tests share, so the session compiles each step once."""
import numpy as np
import pytest

from bagel_jax.data import synthetic as S
from bagel_jax.inference import inferencer as inf
from bagel_jax.inference import model as model_lib
from bagel_jax.models import config as config_lib

CFG = config_lib.tiny("mot")
FAST = inf.GenerationConfig(num_timesteps=3)


@pytest.fixture(scope="module")
def model():
  return model_lib.from_params(model_lib.random_params(CFG, seed=3), CFG)


def scene_image(size=32):
  return S.render(S.Scene((S.Obj("circle", "red", (0.5, 0.5), 0.3),)), size)


def test_context_rules(model):
  s = inf.Session(model, 2, 128)
  s.add_system_prompt(inf.GEN_THINK_SYSTEM_PROMPT)
  n_sys = s.ctx.gen.lengths.copy()
  assert (s.ctx.cfg_img.lengths == n_sys).all() and (s.ctx.cfg_text.lengths == 0).all()
  s.add_image([scene_image(), scene_image()])
  img_tokens = 4 * 4 + 2 + 4 * 4 + 2  # clean VAE block then ViT block of a 32 px image
  assert (s.ctx.gen.lengths - n_sys).tolist() == [img_tokens] * 2
  assert s.ctx.cfg_text is s.ctx.gen and (s.ctx.cfg_img.lengths == n_sys).all()  # images never enter cfg_img
  before_text = s.ctx.gen
  s.add_text(["make the red circle blue", "remove the red circle"])
  assert s.ctx.cfg_text is before_text  # text-uncond = everything before the last text
  assert (s.ctx.cfg_img.lengths - n_sys).tolist() == (s.ctx.gen.lengths - before_text.lengths).tolist()
  thinks = s.think(inf.TextConfig(max_new_tokens=4))
  assert len(thinks) == 2 and s.ctx.cfg_text is before_text  # think text goes to gen only
  assert (s.ctx.gen.lengths > before_text.lengths).all()
  assert s.image_size(None, None) == (32, 32)  # an edit generates at the input's size


def test_think_understanding_and_interleaved_continuation(model):
  short = inf.TextConfig(max_new_tokens=4)  # every session below gets KV capacity 128: one compiled step
  out = inf.text_to_image(model, ["a red circle"], think=True, gen=FAST, text=short)
  assert isinstance(out["think"][0], str) and out["image"].shape == (1, 32, 32, 3)
  a, b, c = (inf.text_to_image(model, ["a red circle"], gen=FAST, text=short, seed=sd)["image"] for sd in (5, 5, 6))
  np.testing.assert_array_equal(a, b)  # seeded
  assert not np.array_equal(a, c)
  e = inf.edit(model, [scene_image(48)], ["make the red circle blue"], text=short,
               gen=inf.GenerationConfig.default_edit(num_timesteps=3))
  assert e["image"].shape == (1, 32, 32, 3)  # the source's size after the VAE-side resize (max 32 px)
  s = out["session"]
  n = s.ctx.gen.lengths.copy()
  s.generate_image(FAST, reinsert=True)  # the generated image becomes clean VAE + ViT context
  assert (s.ctx.gen.lengths - n).tolist() == [4 * 4 + 2 + 4 * 4 + 2]
  s.add_text(["what color is the circle ?"])
  assert isinstance(s.generate_text(short)[0], str)
  answers = inf.understand(model, [scene_image()], ["what color is the circle ?"],
                           text=inf.TextConfig(max_new_tokens=4, do_sample=True, temperature=0.5, top_p=0.9))
  assert len(answers) == 1 and isinstance(answers[0], str)
  assert inf.split_think("<think> a red circle at middle center </think> red") == ("a red circle at middle center",
                                                                                    "red")
