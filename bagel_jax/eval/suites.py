"""The judge-free task suites on the synthetic data's held-out (`test`) split (toy_evaluation.md §4.2-4.3).

- `t2i`: GenEval-like, six tasks (single object, two objects, counting, colours, position, colour attribution)
  scored by `checker.evaluate_geneval`; overall = mean of the six accuracies (GenEval's overall).
- `vqa`: exact-match accuracy of greedy answers (the MMBench analogue), per question type, with the chance
  level of always guessing uniformly among each type's answers.
- `edit`: instruction satisfied (the edited scene is detected as the target scene) and preservation error (mean
  absolute pixel error against the ground-truth edit outside the edited object).
- `reason_edit` (opt-in, in `ALL_SUITES`): the edit suite on instructions that name the object only by its
  position relative to another ("make the object left of the blue square green"), a phrasing no training task
  uses: the synthetic stand-in for reasoning-based editing (IntelligentBench).
- `next_frame`: the moving object detected where constant velocity puts it (hit), its centre error, and the
  frame's mean absolute pixel error.

Every suite is a pure function of (model, settings): prompts come from fixed held-out seeds, generation seeds
from the sample index, so two runs on one checkpoint give the same numbers. Requests run in fixed-size batches
(the last one padded by repeating its final request), and every session uses the same KV capacity, so each
compiled step is compiled once for the whole evaluation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from bagel_jax.data import synthetic as S
from bagel_jax.eval import checker as C
from bagel_jax.inference import inferencer as inf
from bagel_jax.inference import sampler as sampler_lib
from bagel_jax.inference.model import LoadedModel

SUITES = ("t2i", "vqa", "edit", "next_frame")  # the default evaluation
ALL_SUITES = SUITES + ("reason_edit",)
VQA_ANSWERS = dict(count=4, color=len(S.COLORS), shape=len(S.SHAPES), relation=2)  # answers per question type


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  num_samples: int = 4              # prompts per task (per GenEval task for t2i)
  num_timesteps: int = 12
  timestep_shift: float = 3.0
  cfg_text_scale: float = 4.0       # official GenEval / GEdit eval scripts
  cfg_img_scale: float = 1.5        # editing and next-frame (GEdit eval)
  cfg_renorm_type_t2i: str = "global"
  cfg_renorm_type_edit: str = "text_channel"
  cfg_interval_t2i: tuple = (0.0, 1.0)
  cfg_interval_edit: tuple = (0.4, 1.0)
  max_answer_tokens: int = 6
  batch_size: int = 0               # 0: num_samples
  seed: int = 0
  data_seed: int = 0                # the synthetic data's seed (held-out split of that stream)
  num_frames: int = 4
  progress: bool = False

  @property
  def batch(self) -> int:
    return self.batch_size or self.num_samples


def t2i_gen(s: EvalSettings) -> inf.GenerationConfig:
  return inf.GenerationConfig(num_timesteps=s.num_timesteps, timestep_shift=s.timestep_shift,
                              cfg_text_scale=s.cfg_text_scale, cfg_img_scale=1.0, cfg_interval=s.cfg_interval_t2i,
                              cfg_renorm_type=s.cfg_renorm_type_t2i)


def edit_gen(s: EvalSettings) -> inf.GenerationConfig:
  return inf.GenerationConfig(num_timesteps=s.num_timesteps, timestep_shift=s.timestep_shift,
                              cfg_text_scale=s.cfg_text_scale, cfg_img_scale=s.cfg_img_scale,
                              cfg_interval=s.cfg_interval_edit, cfg_renorm_type=s.cfg_renorm_type_edit)


# ----------------------------------------------------------------------------------------------------------
# Held-out prompts.
# ----------------------------------------------------------------------------------------------------------

def t2i_cases(s: EvalSettings) -> List[Dict[str, Any]]:
  """num_samples held-out scenes per GenEval task, disjoint across tasks."""
  out = []
  for k, task in enumerate(C.GENEVAL_TASKS):
    variant = C.TASK_VARIANT[task]
    for i in range(s.num_samples):
      scene = S.t2i_scene(S.record_rng(s.data_seed, "test", "t2i", 100_000 * (k + 1) + i), variant)
      out.append(dict(task=task, prompt=S.caption(scene, variant), scene=scene, index=i))
  return out


def records(task: str, s: EvalSettings, image_size: int) -> List[Dict[str, Any]]:
  src = S.SyntheticSource(task, "test", max(s.num_samples, 1), image_size, s.data_seed, s.num_frames)
  return [src[i] for i in range(s.num_samples)]


# ----------------------------------------------------------------------------------------------------------
# Batched running.
# ----------------------------------------------------------------------------------------------------------

def _chunks(items: Sequence[Any], size: int):
  for i in range(0, len(items), size):
    chunk = list(items[i:i + size])
    yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def run_batched(items, s: EvalSettings, fn: Callable[[list, int], list]) -> list:
  """fn(chunk of `batch` items, chunk index) -> per-item results; padding results dropped."""
  out = []
  for j, (chunk, n) in enumerate(_chunks(items, s.batch)):
    out += list(fn(chunk, j))[:n]
  return out


def suite_inputs(model: LoadedModel, s: EvalSettings) -> Dict[str, List[list]]:
  """The interleaved inputs of every suite's requests (what the KV capacity must hold)."""
  size = model.gen_size[0]
  return dict(
      t2i=[[c["prompt"]] for c in t2i_cases(s)],
      vqa=[[r["images"][0], r["texts"][0]] for r in records("vqa", s, size)],
      edit=[[r["images"][0], r["texts"][0]] for r in records("edit", s, size)],
      reason_edit=[[r["images"][0], r["texts"][0]] for r in records("reason_edit", s, size)],
      next_frame=[[r["texts"][0]] + list(r["images"][:-1]) for r in records("next_frame", s, size)])


def capacity_for(model: LoadedModel, s: EvalSettings) -> int:
  """One KV capacity for every suite (the largest need, whichever suites run), so the compiled steps are shared
  by all suites and by every checkpoint of an emergence sweep."""
  inputs = suite_inputs(model, s)
  return max(inf.estimate_capacity(model, inputs[k], s.max_answer_tokens) for k in ALL_SUITES)


def _session_images(model, inputs, s: EvalSettings, gen, capacity: int, seed: int) -> np.ndarray:
  res = inf.interleave(model, inputs, gen=gen, seed=seed, capacity=capacity, progress=s.progress)
  return res["image"]


# ----------------------------------------------------------------------------------------------------------
# Suites.
# ----------------------------------------------------------------------------------------------------------

def eval_t2i(model: LoadedModel, s: EvalSettings, capacity: int) -> Dict[str, Any]:
  cases = t2i_cases(s)
  gen = t2i_gen(s)
  images = run_batched(cases, s, lambda chunk, j: _session_images(
      model, [[c["prompt"]] for c in chunk], s, gen, capacity, s.seed * 7919 + j))
  per_task: Dict[str, List[bool]] = {t: [] for t in C.GENEVAL_TASKS}
  samples = []
  for c, img in zip(cases, images):
    ok, why = C.check_t2i(img, c["task"], c["scene"])
    per_task[c["task"]].append(bool(ok))
    samples.append(dict(suite="t2i", task=c["task"], prompt=c["prompt"], correct=bool(ok), reason=why, image=img))
  scores = {t: float(np.mean(v)) for t, v in per_task.items()}
  scores["overall"] = float(np.mean([scores[t] for t in C.GENEVAL_TASKS]))
  return dict(scores=scores, samples=samples)


def eval_vqa(model: LoadedModel, s: EvalSettings, capacity: int) -> Dict[str, Any]:
  size = model.gen_size[0]
  recs = records("vqa", s, size)
  text = inf.TextConfig(max_new_tokens=s.max_answer_tokens)

  def run(chunk, j):
    res = inf.interleave(model, [[r["images"][0], r["texts"][0]] for r in chunk], understanding_output=True,
                         text=text, seed=s.seed + j, capacity=capacity)
    return res["text"]

  answers = run_batched(recs, s, run)
  by_type: Dict[str, List[bool]] = {}
  samples = []
  for r, a in zip(recs, answers):
    m = r["meta"]
    ok = normalize_answer(a) == normalize_answer(m["answer"])
    by_type.setdefault(m["qtype"], []).append(ok)
    samples.append(dict(suite="vqa", task=m["qtype"], prompt=m["question"], answer=a, truth=m["answer"],
                        correct=bool(ok), image=r["images"][0]))
  acc = float(np.mean([x["correct"] for x in samples])) if samples else 0.0
  chance = float(np.mean([1.0 / VQA_ANSWERS[x["task"]] for x in samples])) if samples else 0.0
  return dict(scores=dict(accuracy=acc, chance=chance, **{f"acc_{k}": float(np.mean(v)) for k, v in by_type.items()}),
              samples=samples)


def normalize_answer(a: str) -> str:
  return " ".join(inf.split_think(a)[1].lower().replace("?", " ").replace(".", " ").split())


def eval_edit(model: LoadedModel, s: EvalSettings, capacity: int, task: str = "edit") -> Dict[str, Any]:
  size = model.gen_size[0]
  recs = records(task, s, size)
  gen = edit_gen(s)
  images = run_batched(recs, s, lambda chunk, j: _session_images(
      model, [[r["images"][0], r["texts"][0]] for r in chunk], s, gen, capacity, s.seed * 104729 + j))
  samples = []
  for r, img in zip(recs, images):
    m = r["meta"]
    src, tgt = (S.Scene.from_dict(d) for d in m["scenes"])
    ok, why = C.edit_satisfied(img, src, tgt, m["edit"])
    region = C.edited_region(src, tgt, m["edit"], img.shape[0])
    err = C.preservation_error(img, r["images"][1], region)
    samples.append(dict(suite=task, task=m["edit"]["op"], prompt=m["instruction"], correct=bool(ok), reason=why,
                        preservation_error=err, image=img, source=r["images"][0]))
  ops: Dict[str, List[bool]] = {}
  for x in samples:
    ops.setdefault(x["task"], []).append(x["correct"])
  scores = dict(satisfied=float(np.mean([x["correct"] for x in samples])),
                preservation_error=float(np.mean([x["preservation_error"] for x in samples])),
                **{f"satisfied_{k}": float(np.mean(v)) for k, v in ops.items()})
  return dict(scores=scores, samples=samples)


def eval_next_frame(model: LoadedModel, s: EvalSettings, capacity: int) -> Dict[str, Any]:
  size = model.gen_size[0]
  recs = records("next_frame", s, size)
  gen = edit_gen(s)
  images = run_batched(recs, s, lambda chunk, j: _session_images(
      model, [[r["texts"][0]] + list(r["images"][:-1]) for r in chunk], s, gen, capacity, s.seed * 1299709 + j))
  samples = []
  for r, img in zip(recs, images):
    truth = S.Scene.from_dict(r["meta"]["scenes"][-1])
    hit, err = C.next_frame_check(img, truth)
    samples.append(dict(suite="next_frame", task="next_frame", prompt=r["texts"][0], correct=bool(hit),
                        center_error=err, mae=C.mean_abs_error(img, r["images"][-1]), image=img,
                        source=r["images"][-2]))
  scores = dict(hit=float(np.mean([x["correct"] for x in samples])),
                center_error=float(np.mean([x["center_error"] for x in samples])),
                mae=float(np.mean([x["mae"] for x in samples])))
  return dict(scores=scores, samples=samples)


def eval_vae_ceiling(model: LoadedModel, s: EvalSettings) -> Dict[str, Any]:
  """The T2I suite scored on ground-truth renders passed through this model's VAE (encode, decode): the best a
  perfect latent generator could score. A frozen random-init VAE scores ~0 here, which explains a zero T2I."""
  import jax  # pylint: disable=import-outside-toplevel
  cases = t2i_cases(s)
  size = model.gen_size[0]
  f = model.config.latent_downsample

  def roundtrip(chunk, j):
    px = np.stack([S.render(c["scene"], size) for c in chunk]).astype(np.float32) / 127.5 - 1.0
    lat = sampler_lib.encode_images(model.params, jax.numpy.asarray(px), jax.random.key(j), config=model.config)
    return np.asarray(sampler_lib.decode_latents(model.params, lat, config=model.config, grid=(size // f, size // f)))

  images = run_batched(cases, s, roundtrip)
  ok = [C.check_t2i(img, c["task"], c["scene"])[0] for c, img in zip(cases, images)]
  return dict(scores=dict(t2i_overall=float(np.mean(ok)),
                          mae=float(np.mean([C.mean_abs_error(img, S.render(c["scene"], size))
                                             for c, img in zip(cases, images)]))))


def eval_reason_edit(model: LoadedModel, s: EvalSettings, capacity: int) -> Dict[str, Any]:
  return eval_edit(model, s, capacity, task="reason_edit")


SUITE_FNS = dict(t2i=eval_t2i, vqa=eval_vqa, edit=eval_edit, next_frame=eval_next_frame,
                 reason_edit=eval_reason_edit)
HEADLINE = dict(t2i=("t2i", "overall"), vqa=("vqa", "accuracy"), edit=("edit", "satisfied"),
                next_frame=("next_frame", "hit"), reason_edit=("reason_edit", "satisfied"))


def headline(results: Dict[str, Any]) -> Dict[str, float]:
  """One score per suite (what the emergence curves plot)."""
  out = {}
  for name, (suite, key) in HEADLINE.items():
    if suite in results and key in results[suite]["scores"]:
      out[name] = float(results[suite]["scores"][key])
  return out

