"""Built-in synthetic multimodal data: procedural scenes of coloured shapes, no downloads.

Every sample carries its ground truth (`Scene`s, the question's exact answer, the edit applied) so the
judge-free evaluation (toy_evaluation.md §4.2-4.3) can score generations against it. The same scene model
renders training targets and checks evaluations, so a checker validated on `render(scene)` measures the
model, not the renderer.

Split by concern, one module each; this package's namespace is the public API (`synthetic.render`, ...):
- `scenes`: the scene model (`Obj`, `Word`, `Scene`, the 10 GenEval `COLORS`), rendering and scene sampling;
- `captions`: the text templates;
- `tasks`: the tasks (`TASKS`) -> records (`make_example`, `record_rng`);
- `sources`: `SyntheticSource` (Grain random access) and the `bagel_synthetic` TFDS builder.
"""
from bagel_jax.data.synthetic.captions import a_obj, caption, count_phrase, describe, h_pos, story, v_pos
from bagel_jax.data.synthetic.scenes import (BACKGROUND, COLORS, DIRECTIONS, GAP, NUMBERS, PLURALS,
                                             POSITION_THRESHOLD, RELATIONS, SHAPES, SIZE_RANGE, WORD_BACKGROUND,
                                             WORDS, Obj, Scene, Word, encode_png, is_free, place, relations,
                                             relative_position, render, render_labels, sample_attributes,
                                             sample_relation_scene, sample_scene, sample_size)
from bagel_jax.data.synthetic.sources import SyntheticSource, tfds_builder, tfds_builder_class
from bagel_jax.data.synthetic.tasks import (EDIT_OPS, EVAL_ONLY_TASKS, GEN_TASKS, REASON_EDIT_OPS, SPLITS,
                                            T2I_VARIANTS, TASKS, UND_TASKS, VQA_TYPES, check_t2i_variants,
                                            edit_triple, json_meta, make_example, motion, reason_edit_triple,
                                            record_rng, t2i_scene, vqa_pair, word_scene)
