"""Layout of every BAGEL sample kind from source records, against hand-written expectations (reference §1.4,
§1.5, §3.4, §4.1, §5.5): splits and modes, RoPE positions (one id per image block, noisy images not advancing,
CFG-dropped images advancing by 1 and dropped text by 0), CE labels including <|im_end|>, MSE only on noisy
latents, expert ids in the packed row."""
import numpy as np
import pytest

from bagel_jax import batch as batch_lib
from bagel_jax.batch import PAD, TEXT, VAE, VIT
from bagel_jax.data import pipeline, samples, synthetic
from bagel_jax.data.config import synthetic_mixture
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.data.sequence import (Dropped, Text, VaeImage, VitImage, apply_cfg_dropout, assemble_batch,
                                     layout_sample)
from bagel_jax.layout import LayoutConfig
from bagel_jax.data.tokenizer import WordTokenizer
from bagel_jax.kernels.mask import CAUSAL, FULL, NOISE
from bagel_jax.models.config import tiny

BOS, EOS, VS, VE = 1, 2, 3, 4
CFG = tiny()
LAYOUT = LayoutConfig.from_model_config(CFG)
TOK = WordTokenizer.load()
SPEC = batch_spec_for(CFG, batch_size=1, seq_len=256, vit_capacity=96, latent_capacity=128, image_capacity=12,
                      pixel_images=8, pixel_size=32)


def scfg(text=0.0, vit=0.0, vae=0.0):
  dc = synthetic_mixture().replace(text_dropout=text, vit_dropout=vit, vae_dropout=vae)
  return pipeline.sample_config(dc, SPEC, LAYOUT)


def lay(record, cfg=None, seed=0):
  items = samples.build_items(record, TOK, cfg or scfg(), np.random.default_rng(seed))
  return items, layout_sample(items, LAYOUT)


def img(scene=None):
  scene = scene or synthetic.Scene((synthetic.Obj("circle", "red", (0.5, 0.5), 0.3),))
  return synthetic.render(scene, 32)


def ids(text):
  return TOK.encode(text)


# Hand-written blocks: (token ids, modality, split, mode, positions, ce targets, mse weights).
def text_block(tokens, split, pos0, loss):
  n = len(tokens) + 2
  ce = list(tokens) + [EOS] + [0] if loss else [0] * n
  return ([BOS] + list(tokens) + [EOS], [TEXT] * n, [split] * n, [CAUSAL] * n, list(range(pos0, pos0 + n)), ce,
          [0.0] * n)


def image_block(kind, n, split, mode, pos, noisy=False):
  m = VIT if kind == "vit" else VAE
  return ([VS] + [0] * n + [VE], [TEXT] + [m] * n + [TEXT], [split] * (n + 2), [mode] * (n + 2), [pos] * (n + 2),
          [0] * (n + 2), [0.0] + [1.0 if noisy else 0.0] * n + [0.0])


def check(layout, blocks):
  cols = [sum((list(b[k]) for b in blocks), []) for k in range(7)]
  np.testing.assert_array_equal(layout.text_ids, cols[0], "text ids")
  np.testing.assert_array_equal(layout.modality, cols[1], "modality")
  np.testing.assert_array_equal(layout.split, cols[2], "split")
  np.testing.assert_array_equal(layout.split_mode, cols[3], "split mode")
  np.testing.assert_array_equal(layout.position, cols[4], "position")
  np.testing.assert_array_equal(layout.ce_target, cols[5], "CE targets")
  np.testing.assert_array_equal(layout.ce_weight, (np.array(cols[5]) > 0).astype(np.float32), "CE weights")
  np.testing.assert_array_equal(layout.mse_weight, cols[6], "MSE weights")


def packed_row(layout):
  """The sample alone in a packed row: validate() and the expert ids (gen = latent tokens only)."""
  b = assemble_batch([[layout]], SPEC, LAYOUT)
  batch_lib.validate(b, SPEC)
  n = len(layout)
  np.testing.assert_array_equal(b["expert"][0, :n], (layout.modality == VAE).astype(np.int32))
  assert np.all(b["modality"][0, n:] == PAD) and b["num_documents"][0] == 1
  return b


def test_t2i_literal():
  """'a red circle' -> noisy 4x4 latent image, every value written out."""
  rec = dict(kind="t2i", texts=["a red circle"], images=[img()])
  items, s = lay(rec)
  a, red, circle = ids("a red circle")
  np.testing.assert_array_equal(s.text_ids, [BOS, a, red, circle, EOS, VS] + [0] * 16 + [VE])
  np.testing.assert_array_equal(s.position, [0, 1, 2, 3, 4] + [5] * 18)
  np.testing.assert_array_equal(s.split, [1] * 5 + [2] * 18)
  np.testing.assert_array_equal(s.split_mode, [CAUSAL] * 5 + [NOISE] * 18)
  np.testing.assert_array_equal(s.ce_weight, [0] * 23)  # the caption is a condition, no CE
  np.testing.assert_array_equal(s.mse_weight, [0] * 6 + [1] * 16 + [0])
  assert np.isfinite(s.images[0]["t_logit"]) and s.images[0]["grid"] == (4, 4)
  b = packed_row(s)
  np.testing.assert_array_equal(b["latent_dest"][0, :16], np.arange(6, 22))
  assert b["num_mse"][0] == 16 and b["num_ce"][0] == 0
  # pixels are the render, normalised to [-1, 1]
  np.testing.assert_allclose(s.images[0]["pixels"], img() / 127.5 - 1, atol=1e-6)


def test_text_only_labels_include_im_end():
  rec = dict(kind="text", texts=["there is a red star ."], images=[])
  _, s = lay(rec)
  t = ids("there is a red star .")
  check(s, [text_block(t, 1, 0, loss=True)])
  assert s.ce_target[len(t)] == EOS and s.ce_weight[len(t) + 1] == 0  # <|im_end|> is a label; nothing after it
  packed_row(s)


def test_caption_and_vqa():
  _, s = lay(dict(kind="caption", texts=["a red circle"], images=[img()]))
  check(s, [image_block("vit", 16, 1, FULL, 0), text_block(ids("a red circle"), 2, 1, loss=True)])
  packed_row(s)
  q, a = "what color is the circle ?", "red"
  _, s = lay(dict(kind="vqa", texts=[q, a], images=[img()]))
  nq = len(ids(q)) + 2
  check(s, [image_block("vit", 16, 1, FULL, 0), text_block(ids(q), 2, 1, loss=False),
            text_block(ids(a), 3, 1 + nq, loss=True)])
  b = packed_row(s)
  assert b["num_ce"][0] == 2 and b["num_mse"][0] == 0  # 'red' and <|im_end|>


def test_edit_source_vae_vit_instruction_noisy_target():
  src, tgt = img(), img(synthetic.Scene((synthetic.Obj("circle", "blue", (0.5, 0.5), 0.3),)))
  rec = dict(kind="edit", texts=["make the red circle blue"], images=[src, tgt])
  items, s = lay(rec)
  assert [type(i).__name__ for i in items] == ["VaeImage", "VitImage", "Text", "VaeImage"]
  assert items[0].cfg and items[1].cfg and items[2].cfg and not items[3].cfg  # conditions droppable, target not
  n = len(ids("make the red circle blue")) + 2
  check(s, [image_block("vae", 16, 1, FULL, 0), image_block("vit", 16, 2, FULL, 1),
            text_block(ids("make the red circle blue"), 3, 2, loss=False),
            image_block("vae", 16, 4, NOISE, 2 + n, noisy=True)])
  assert s.images[0]["t_logit"] == -np.inf and np.isfinite(s.images[2]["t_logit"])
  packed_row(s)


def test_cfg_dropout_rope_rules():
  """Dropped ViT/VAE advance the RoPE id by 1, dropped text by 0 (official pack_sequence)."""
  src, tgt = img(), img()
  rec = dict(kind="edit", texts=["make the red circle blue"], images=[src, tgt])
  items, s = lay(rec, scfg(text=1.0, vit=1.0, vae=0.0))
  assert [type(i).__name__ for i in items] == ["VaeImage", "Dropped", "Dropped", "VaeImage"]
  assert [i.advance for i in items if isinstance(i, Dropped)] == [1, 0]
  check(s, [image_block("vae", 16, 1, FULL, 0), image_block("vae", 16, 2, NOISE, 2, noisy=True)])
  items, s = lay(rec, scfg(text=0.0, vit=0.0, vae=1.0))
  n = len(ids("make the red circle blue")) + 2
  check(s, [image_block("vit", 16, 1, FULL, 1), text_block(ids("make the red circle blue"), 2, 2, loss=False),
            image_block("vae", 16, 3, NOISE, 2 + n, noisy=True)])
  # T2I caption dropped: the noisy image starts the sample at position 0
  _, s = lay(dict(kind="t2i", texts=["a red circle"], images=[img()]), scfg(text=1.0))
  check(s, [image_block("vae", 16, 1, NOISE, 0, noisy=True)])


def test_cfg_dropout_rates_and_non_droppable():
  rng = np.random.default_rng(0)
  items = [Text([7], cfg=True), VitImage(np.zeros((1, 192), np.float32), (1, 1), cfg=True),
           VaeImage((1, 1), pixels=np.zeros((8, 8, 3), np.float32), cfg=True),
           Text([8], loss=True), VaeImage((1, 1), pixels=np.zeros((8, 8, 3), np.float32), noisy=True)]
  drops = np.zeros(5)
  for _ in range(4000):
    out = apply_cfg_dropout(items, rng, 0.1, 0.5, 0.1)
    drops += [isinstance(o, Dropped) for o in out]
  np.testing.assert_allclose(drops[:3] / 4000, [0.1, 0.5, 0.1], atol=0.03)
  assert drops[3] == drops[4] == 0
  with pytest.raises(ValueError, match="noisy"):
    apply_cfg_dropout([VaeImage((1, 1), pixels=np.zeros((8, 8, 3)), noisy=True, cfg=True)], rng)


def test_video_group_one_split_frame_deltas():
  rec = synthetic.make_example("video", np.random.default_rng(3), 32, num_frames=3)
  items, s = lay(rec)
  cap = ids(rec["texts"][0])
  n = len(cap) + 2
  frames = [image_block("vae", 16, 2, FULL, n + k, noisy=True) for k in range(3)]  # one `full` split
  check(s, [text_block(cap, 1, 0, loss=False)] + frames)
  t = {im["t_logit"] for im in s.images}
  assert len(t) == 1 and np.isfinite(t.pop())  # one timestep for the group
  packed_row(s)


def test_next_frame_context_then_noisy_target():
  rec = synthetic.make_example("next_frame", np.random.default_rng(4), 32, num_frames=3)
  _, s = lay(rec)
  cap = ids(rec["texts"][0])
  p = len(cap) + 2
  check(s, [text_block(cap, 1, 0, loss=False),
            image_block("vae", 16, 2, FULL, p), image_block("vit", 16, 3, FULL, p + 1),
            image_block("vae", 16, 4, FULL, p + 2), image_block("vit", 16, 5, FULL, p + 3),
            image_block("vae", 16, 6, NOISE, p + 4, noisy=True)])
  packed_row(s)


def test_think_modes():
  rec = synthetic.make_example("think_t2i", np.random.default_rng(5), 32)
  _, s = lay(rec)
  sys_ids, prompt, think = ids(samples.GEN_THINK_SYSTEM_PROMPT), ids(rec["texts"][0]), ids(rec["texts"][1])
  assert think[0] == TOK.ids["<think>"] and think[-1] == TOK.ids["</think>"]
  a, b, c = len(sys_ids) + 2, len(prompt) + 2, len(think) + 2
  check(s, [text_block(sys_ids, 1, 0, False), text_block(prompt, 2, a, False), text_block(think, 3, a + b, True),
            image_block("vae", 16, 4, NOISE, a + b + c, noisy=True)])
  packed_row(s)
  rec = synthetic.make_example("think_vqa", np.random.default_rng(6), 32)
  _, s = lay(rec)
  sys_ids, q, ans = ids(samples.VLM_THINK_SYSTEM_PROMPT), ids(rec["texts"][0]), ids(rec["texts"][1])
  a = len(sys_ids) + 2
  check(s, [text_block(sys_ids, 1, 0, False), image_block("vit", 16, 2, FULL, a),
            text_block(q, 3, a + 1, False), text_block(ans, 4, a + 1 + len(q) + 2, True)])
  packed_row(s)


def test_interleave_plan_multi_image():
  """Generic interleaved record: text, image as noisy target then clean VAE + ViT context, text with loss."""
  plan = [dict(type="text", index=0), dict(type="image", index=0, noisy=True, vae=True, vit=True),
          dict(type="text", index=1, loss=True)]
  rec = dict(kind="interleave", texts=["a red circle", "a red circle"], images=[img()], plan=plan)
  _, s = lay(rec)
  t = ids("a red circle")
  check(s, [text_block(t, 1, 0, False), image_block("vae", 16, 2, NOISE, 5, noisy=True),
            image_block("vae", 16, 3, FULL, 5), image_block("vit", 16, 4, FULL, 6),
            text_block(t, 5, 7, True)])
  packed_row(s)


def test_rows_of_several_kinds_pack_with_offsets():
  """Documents back to back: splits renumbered per row, positions restart per document, image ids 1..n."""
  rng = np.random.default_rng(0)
  layouts = [lay(synthetic.make_example(k, rng, 32), seed=i)[1] for i, k in enumerate(("t2i", "vqa", "edit"))]
  spec = batch_spec_for(CFG, batch_size=1, seq_len=256, vit_capacity=96, latent_capacity=128, image_capacity=12,
                        pixel_images=8, pixel_size=32)
  b = assemble_batch([layouts], spec, LAYOUT)
  batch_lib.validate(b, spec)
  start = 0
  for d, s in enumerate(layouts, start=1):
    sl = slice(start, start + len(s))
    assert np.all(b["document"][0, sl] == d) and b["position"][0, start] == 0
    np.testing.assert_array_equal(b["position"][0, sl], s.position)
    start += len(s)
  assert b["split"][0, start - 1] == sum(int(s.split.max()) for s in layouts)
  np.testing.assert_array_equal(np.unique(b["latent_image"][0][b["latent_image"][0] > 0]), [1, 3, 5])
  np.testing.assert_array_equal(np.unique(b["vit_image"][0][b["vit_image"][0] > 0]), [2, 4])
