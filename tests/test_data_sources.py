"""Sources and mixing: TFDS (ArrayRecord written to tmp_path, read with tfds.data_source) through the same
pipeline as real data, per-stage mixture weights (gen:und, Table 3), config parsing, and the trainer's hooks."""
import json

import ml_collections
import numpy as np
import pytest

from bagel_jax import batch as batch_lib
from bagel_jax.data import pipeline, sources, synthetic
from bagel_jax.data.config import (DataConfig, SourceConfig, stage_weights, synthetic_mixture,
                                   synthetic_stage_mixture)
from bagel_jax.data.examples import batch_spec_for
from bagel_jax.layout import LayoutConfig
from bagel_jax.models.config import tiny

CFG = tiny()
LAYOUT = LayoutConfig.from_model_config(CFG)
SPEC = batch_spec_for(CFG, batch_size=2, seq_len=256, vit_capacity=96, latent_capacity=160, image_capacity=16,
                      pixel_images=10, pixel_size=32)


def test_tfds_source_through_the_pipeline(tmp_path):
  synthetic.tfds_builder(str(tmp_path), "small").download_and_prepare()
  src = sources.TfdsSource("bagel_synthetic/small", "train", str(tmp_path))
  assert len(src) == 64 * len(synthetic.TASKS)
  rec = next(src[i] for i in range(len(src)) if len(src[i]["images"]))
  assert isinstance(rec["images"][0], bytes) and json.loads(rec["meta"])["scenes"]  # PNG bytes + ground truth
  dc = DataConfig(sources=(SourceConfig("tfds", "tfds", path="bagel_synthetic/small", data_dir=str(tmp_path)),
                           SourceConfig("proc", "synthetic", task="vqa", weight=0.5)), prefetch=0, validate=True)
  it = pipeline.make_pipeline(dc, SPEC, LAYOUT, seed=0)
  for _ in range(10):
    next(it)
  s = it.stats
  assert s["skipped"] == 0 and s["source/tfds"] > 0 and s["source/proc"] > 0
  assert 1.6 < s["source/tfds"] / s["source/proc"] < 2.4  # weights 1 : 0.5


def test_gen_und_and_stage_weights():
  dc = synthetic_mixture(gen_und=4.0)
  w = dc.weights()
  gen = sum(v for k, v in w.items() if k in synthetic.GEN_TASKS)
  und = sum(v for k, v in w.items() if k in synthetic.UND_TASKS)
  assert gen / und == pytest.approx(4.0)
  pt = dict(text=0.05, t2i=0.6, i2t=0.1, interleaved_und=0.1, video=0.1, web=0.05)  # Table 3, PT
  sw = stage_weights(pt, {"a": "t2i", "b": "t2i", "c": "text"})
  assert sw == {"a": 0.3, "b": 0.3, "c": 0.05}
  m = synthetic_stage_mixture(pt).weights()
  assert m["t2i"] == pytest.approx(0.2) and m["vqa"] == pytest.approx(0.05) and m["edit"] == pytest.approx(0.05)
  align = synthetic_stage_mixture(dict(text=0.0, t2i=0.0, i2t=1.0, interleaved_und=0.0, video=0.0, web=0.0))
  assert sorted(s.name for s in align.sources) == ["caption", "vqa"]
  with pytest.raises(ValueError, match="group"):
    DataConfig(sources=(SourceConfig("m", "jsonl", path="x.jsonl"), SourceConfig("s", "synthetic", task="t2i")),
               gen_und=4.0).weights()


def test_config_dict_roundtrip():
  c = ml_collections.ConfigDict(dict(source="pipeline", seed=3, num_workers=2, gen_size=[32, 32], sources=[
      dict(name="m", type="jsonl", path="/data/m.jsonl", group="und"),
      dict(name="t", type="synthetic", task="t2i", weight=2.0)]))
  dc = DataConfig.from_config(c)
  assert dc.seed == 3 and dc.num_workers == 2 and dc.sources[0].path == "/data/m.jsonl"
  assert dc.gen_size == (32, 32) and dc.sources[1].resolved_group == "gen"
  default = DataConfig.from_config(ml_collections.ConfigDict(dict(source="synthetic", seed=0)))
  assert default.gen_und == 4.0 and {s.task for s in default.sources} == set(synthetic.TASKS) - set(synthetic.EVAL_ONLY_TASKS)
  with pytest.raises(ValueError, match=r"sources\[0\]: unknown keys"):
    DataConfig.from_config(dict(sources=[dict(name="x", type="synthetic", task="t2i", colour="red")]))


def test_synthetic_source_variants_restrict_the_scene_kind():
  """`SourceConfig.variants` (a config list) narrows a synthetic t2i source to those scene kinds (the demo
  trains on single objects); a variant elsewhere or an unknown one is refused by name."""
  c = ml_collections.ConfigDict(dict(sources=[dict(name="t", type="synthetic", task="t2i", variants=["single"])]))
  dc = DataConfig.from_config(c)
  assert dc.sources[0].variants == ("single",)
  src = sources.open_source(dc.sources[0], dc)
  assert {src[i]["meta"]["variant"] for i in range(40)} == {"single"}
  everything = sources.open_source(SourceConfig("t", "synthetic", task="t2i"), dc)
  assert len({everything[i]["meta"]["variant"] for i in range(40)}) > 1
  with pytest.raises(ValueError, match=r"SourceConfig\(t\)\.variants.*subset"):
    SourceConfig("t", "synthetic", task="t2i", variants=("single", "triangle"))
  with pytest.raises(ValueError, match=r"SourceConfig\(v\)\.variants.*applies only"):
    SourceConfig("v", "synthetic", task="vqa", variants=("single",))


def test_trainer_hooks_on_the_tiny_stage_config():
  """experiments/bagel_7b (model=tiny) selects source 'synthetic': the trainer resolves the config into typed
  objects once and `make_input` builds the pipeline, scanning the sources first (pixel-mode batch)."""
  from experiments.bagel_7b import pretrain
  from bagel_jax.train import config as train_config, inputs
  c = pretrain.get_config("model=tiny")
  c.batch.update(dict(vae_image_capacity=16, vae_image_size=32))
  run = train_config.resolve(c, n_devices=1, process_count=1)
  need = pipeline.scan_sources(run.data, run.spec, LayoutConfig.from_model_config(run.model)).need
  assert need["tokens"] < 200 and need["latent_tokens"] == 64 and need["vae_images"] == 4  # video: 4 frames
  spec = run.spec
  it = inputs.make_input(run, spec, 0, 1)
  b = next(it)
  batch_lib.validate(b, spec)
  assert isinstance(it.get_state(), bytes) and "tokens_per_s" in it.stats
  it.close()
  c.batch.vae_image_capacity = 0
  run = train_config.resolve(c, n_devices=1, process_count=1)
  with pytest.raises(ValueError, match="pixel-mode"):
    inputs.make_input(run, run.spec, 0, 1)


def test_latent_mode_records_with_precomputed_latents():
  """Latent-mode batches (latent_x0) take the record's precomputed [h, w, C] latents."""
  spec = batch_spec_for(CFG, batch_size=1, seq_len=64, vit_capacity=16, latent_capacity=32, image_capacity=4)
  scfg = pipeline.sample_config(synthetic_mixture(), spec, LAYOUT)
  from bagel_jax.data import samples
  from bagel_jax.data.tokenizer import WordTokenizer
  lat = np.random.default_rng(0).normal(size=(2, 3, CFG.latent_channels)).astype(np.float32)
  rec = dict(kind="t2i", texts=["a red circle"], images=[np.zeros((16, 24, 3), np.uint8)], latents=[lat])
  items = samples.build_items(rec, WordTokenizer.load(), scfg, np.random.default_rng(0))
  assert items[-1].grid == (2, 3) and np.array_equal(items[-1].latents, lat.reshape(6, -1))
  with pytest.raises(samples.SkipSample, match="no precomputed latents"):
    samples.build_items(dict(rec, latents=None), WordTokenizer.load(), scfg, np.random.default_rng(0))
