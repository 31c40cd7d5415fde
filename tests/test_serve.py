"""`bagel-serve` without a browser: the backend (inputs, progress hooks, compiled-step reuse, one request at a time,
checkpoint panel, reload) and the page's handlers (streamed text, a status per denoising step, errors as page
messages), on a tiny workdir made here. The same page in a real browser: test_serve_browser.py."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bagel_jax.inference import contexts as ctx_lib
from bagel_jax.serve import backend as backend_lib
from bagel_jax.serve.backend import Backend, Sampling, UserError

import serve_fixtures as F

FAST = Sampling(num_timesteps=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return F.make_workdir(str(tmp_path_factory.mktemp("serve_run")))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  return F.write_bad_inputs(str(tmp_path_factory.mktemp("serve_bad")))


@pytest.fixture(scope="module")
def backend(workdir):
  return Backend.from_checkpoint(workdir)


def test_checkpoint_panel_and_reload(backend, workdir, tmp_path):
  info = backend.checkpoint_info()
  assert info["step"] == 200 and info["weights"] == "ema" and info["steps"] == [100, 200]
  assert info["tokens_seen"] == 200 * F.TOKENS_PER_STEP  # the half-written last line is skipped
  assert info["loss_curves"].endswith("loss_curves.png") and info["metrics"]["ce_avg"] > 1.0
  assert info["eval"]["step"] == 200 and info["eval"]["scores"]["vqa"] == 0.375
  with pytest.raises(UserError, match="cannot load checkpoint"):
    backend.reload(str(workdir) + "/no_such_run")
  assert backend.model.step == 200  # a failed load keeps the model that was there
  info = backend.reload(workdir, step=100, use_ema=True)  # step 100 has no EMA: raw weights
  assert (info["step"], info["weights"], info["tokens_seen"]) == (100, "params", 100 * F.TOKENS_PER_STEP)
  # a converted release: a bare checkpoint directory (params only, no run beside it)
  from bagel_jax import checkpoint as ckpt_lib
  from bagel_jax.inference import model as model_lib
  converted = tmp_path / "converted"
  ckpt_lib.save_params(str(converted), model_lib.random_params(F.CFG, seed=7), F.CFG, step=0)
  info = backend.reload(str(converted))
  assert (info["step"], info["weights"], info["tokens_seen"], info["loss_curves"], info["eval"]) == (
      0, "params", None, None, None)
  assert backend.understand(f"{workdir}/src.png", "what color ?", max_new_tokens=2)["seconds"] >= 0
  backend.reload(workdir)
  assert (backend.model.step, backend.model.item) == (200, "ema")


def test_requests_stream_report_progress_and_reuse_compiled_steps(backend, workdir):
  src = f"{workdir}/src.png"
  texts = []
  r = backend.understand(src, "what color is the square ?", max_new_tokens=6, on_text=texts.append)
  assert r["answer"] and texts and texts[-1].strip() == r["answer"]
  assert len(texts) >= 2 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # token by token
  steps = []
  g = backend.generate("a red circle", sampling=FAST, height=32, width=48, seed=3,
                       on_step=lambda k, n: steps.append((k, n)))
  assert g["image"].shape == (32, 48, 3) and g["image"].dtype == np.uint8 and g["image"].std() > 0
  assert steps == [(1, 2), (2, 2)]  # one report per Euler step
  e = backend.generate("make the square red", image=src, sampling=Sampling.from_config(
      backend_lib.inf.GenerationConfig.default_edit(num_timesteps=3)))
  assert e["image"].shape == (32, 32, 3)  # an edit keeps the source's size
  plans = []
  t = backend.generate("a red circle", think=True, max_think_tokens=5, sampling=FAST, on_text=plans.append)
  assert t["image"].shape == (32, 32, 3) and plans and isinstance(t["think"], str)
  # same request again: same result (seeded), and nothing is traced or compiled anew
  traces, compiles = dict(ctx_lib.TRACE_COUNTS), dict(ctx_lib.COMPILE_COUNTS)
  t0 = time.time()
  again = backend.generate("a red circle", sampling=FAST, height=32, width=48, seed=3)
  backend.understand(src, "what color is the square ?", max_new_tokens=6)
  np.testing.assert_array_equal(again["image"], g["image"])
  assert dict(ctx_lib.TRACE_COUNTS) == traces and dict(ctx_lib.COMPILE_COUNTS) == compiles
  assert time.time() - t0 < 10


def test_bad_input_is_a_message(backend, workdir, bad):
  src = f"{workdir}/src.png"
  cases = [
      (lambda: backend.understand(bad["not_image"], "what is it ?"), "not an image file"),
      (lambda: backend.generate("make it red", image=bad["huge"], sampling=FAST), "megapixels"),
      (lambda: backend.generate("make it red", image=bad["tiny"], sampling=FAST), "smaller than one patch"),
      (lambda: backend.generate("make it red", image=f"{workdir}/gone.png", sampling=FAST), "upload it again"),
      (lambda: backend.generate("   ", sampling=FAST), "prompt is empty"),
      (lambda: backend.understand(src, ""), "question is empty"),
      (lambda: backend.generate("a red circle", sampling=FAST, height=36, width=32), "multiple of 8"),
      (lambda: backend.generate("a red circle", sampling=FAST, height=4096, width=32), "height must be"),
      (lambda: backend.generate("a red circle", sampling=Sampling(num_timesteps=3, cfg_interval=(0.9, 0.1))),
       "cfg_interval"),
      (lambda: backend.generate("a red circle", sampling=Sampling(num_timesteps=3, cfg_renorm_type="bogus")),
       "cfg_renorm_type"),
      (lambda: backend.understand(src, "what ?", max_new_tokens=0), "max new tokens"),
      (lambda: backend.generate("a red circle", sampling=FAST, seed=-1), "seed"),
  ]
  for fn, msg in cases:
    with pytest.raises(UserError, match=msg):
      fn()
  assert not backend.lock.locked()
  assert backend.generate("a red circle", sampling=FAST)["image"].shape == (32, 32, 3)  # still serving


def test_one_request_at_a_time(backend, monkeypatch):
  """Requests from several threads all finish, each with its own result, and never overlap on the model."""
  events, results, errors = [], {}, []
  generate_image = backend_lib.inf.Session.generate_image

  def tracked(self, *a, **kw):
    events.append((time.perf_counter(), +1))
    try:
      return generate_image(self, *a, **kw)
    finally:
      events.append((time.perf_counter(), -1))

  monkeypatch.setattr(backend_lib.inf.Session, "generate_image", tracked)

  def one(i):
    try:
      results[i] = backend.generate("a red circle", sampling=FAST, seed=i)["image"]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert not errors and sorted(results) == list(range(6))
  depth = peak = 0
  for _, d in sorted(events):
    depth += d
    peak = max(peak, depth)
  assert peak == 1 and depth == 0 and len(events) == 12
  alone = backend.generate("a red circle", sampling=FAST, seed=4)["image"]
  np.testing.assert_array_equal(results[4], alone)  # nothing leaked between concurrent requests


# ----------------------------------------------------------------------------------------------------------
# The page's handlers (what the browser triggers), driven directly.
# ----------------------------------------------------------------------------------------------------------

gradio = pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed")


def _statuses(outputs):
  return [o[-1] for o in outputs if isinstance(o[-1], str)]


def test_handlers_stream_and_report(backend, workdir, bad):
  from bagel_jax.serve import app as app_lib
  h = app_lib.Handlers(backend)
  src = f"{workdir}/src.png"
  outs = list(h.understand(src, "what color is the square ?", False, 6, False, 0.3, 0))
  answers = [o[0] for o in outs if isinstance(o[0], str) and o[0]]
  assert len(answers) >= 2 and outs[-1][2].startswith("answered in")  # streamed, then done
  sampler = [3, 4.0, 1.0, 0.4, 1.0, 3.0, "global", 0.0]
  outs = list(h.generate("a red circle", 40, 24, 0, *sampler))
  st = _statuses(outs)
  assert any(s.startswith("denoising step 1/2") for s in st) and st[-1].startswith("done: 24x40 px")
  first = np.asarray(Image.open(outs[-1][0]))
  assert first.shape == (40, 24, 3)
  again = list(h.generate("a red circle", 40, 24, 0, *sampler))[-1][0]  # the same image, a file of its own
  assert again != outs[-1][0] and np.array_equal(np.asarray(Image.open(again)), first)
  outs = list(h.think("a red circle", None, 4, 32, 32, 0, *sampler))
  assert len(outs[-1]) == 3 and np.asarray(Image.open(outs[-1][1])).shape == (32, 32, 3)
  assert outs[-1][2].startswith("done")
  # errors become the status line, the image is left alone
  for outs, msg in [(list(h.generate("", 32, 32, 0, *sampler)), "prompt is empty"),
                    (list(h.edit(None, "make it red", 0, *sampler)), "upload an image to edit"),
                    (list(h.edit(bad["not_image"], "make it red", 0, *sampler)), "not an image file"),
                    (list(h.understand(bad["huge"], "what is it ?", False, 4, False, 0.3, 0)), "megapixels")]:
    assert outs[-1][-1].startswith(app_lib.ERROR_PREFIX) and msg in outs[-1][-1], outs[-1][-1]
  res = h.load("/no/such/run", "latest", False)
  assert res[-1].startswith(app_lib.ERROR_PREFIX) and "cannot load checkpoint" in res[-1]
  res = h.load(workdir, "100", True)
  assert "step 100 (raw weights)" in res[0] and res[-1].startswith("loaded step 100")
  res = h.load(workdir, "latest", False)
  assert "step 200 (EMA weights)" in res[0] and "819" in res[1] and "vqa" in res[3]


def test_handler_survives_internal_errors(backend, monkeypatch):
  """An unexpected exception in a request is reported in the page and the next request works."""
  from bagel_jax.serve import app as app_lib
  h = app_lib.Handlers(backend)

  def boom(*a, **kw):
    raise RuntimeError("simulated failure")

  monkeypatch.setattr(backend_lib.inf.Session, "generate_image", boom)
  out = list(h.generate("a red circle", 32, 32, 0, 3, 4.0, 1.0, 0.4, 1.0, 3.0, "global", 0.0))
  assert "internal error" in out[-1][-1] and "simulated failure" in out[-1][-1]
  monkeypatch.undo()
  assert not backend.lock.locked()
  out = list(h.generate("a red circle", 32, 32, 0, 3, 4.0, 1.0, 0.4, 1.0, 3.0, "global", 0.0))
  assert out[-1][-1].startswith("done")


def test_build_app_offline(backend):
  """The page builds with the queue set to one model request at a time, and nothing points to the internet."""
  from bagel_jax.serve import app as app_lib
  app = app_lib.build_app(backend, default_steps=3)
  assert app.analytics_enabled is False
  model_fns = [fn for fn in app.fns.values() if fn.concurrency_id == "model"]
  assert len(model_fns) >= 5 and all(fn.concurrency_limit == 1 for fn in model_fns)
  fonts = app_lib.theme()._font + app_lib.theme()._font_mono  # pylint: disable=protected-access
  assert not any(isinstance(f, gradio.themes.GoogleFont) for f in fonts)
