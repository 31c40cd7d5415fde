"""`bagel-serve` end to end in a real headless browser (Debian's Chromium driven by Playwright).

Starts `python -m bagel_jax.serve` on a free localhost port over a tiny workdir made here, then, as a person
would: asks about an uploaded image and gets text; generates at a requested size and finds a non-blank image of
that size in the page, having seen a status line for a denoising step; edits; thinks; reads the checkpoint
panel and loads another step; and submits bad input (a non-image, a huge image, an empty prompt, an unknown
checkpoint path), each answered by a message in the page while the server keeps running. A screenshot of each
mode is written to the test's tmp dir, and to $BAGEL_SERVE_SCREENSHOTS (e.g. docs/images) when set.

Chromium comes from Debian (`make test` installs it; this set-up tries the same as root when it is missing) and
is started with a fresh profile and no network features; without it the test skips, saying why.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import serve_fixtures as F

pytestmark = [pytest.mark.slow, pytest.mark.smoke]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 300
REQUEST_S = 300  # the first request of each kind compiles (5-15 s on an idle 2-core machine; much more when shared)


def _chromium() -> str:
  path = shutil.which("chromium")
  if path:
    return path
  if os.geteuid() == 0 and shutil.which("apt-get"):  # what `make test` does; CI runs as root
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
      subprocess.run("apt-get update -qq && apt-get install -y -qq chromium chromium-driver", shell=True, env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900, check=False)
    except subprocess.TimeoutExpired:
      pass
    path = shutil.which("chromium")
  if not path:
    pytest.skip("no Chromium: Debian's `chromium` package is not installed and could not be installed here "
                "(needs root and the Debian package mirror)")
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  d = tmp_path_factory.mktemp("serve_browser")
  workdir = F.make_workdir(str(d / "run"))
  port = _free_port()
  log_path = d / "server.log"
  env = dict(os.environ, JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(d / "gradio"))
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "bagel_jax.serve", "--checkpoint", workdir, "--port", str(port),
                             "--default-steps", "3"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  url = f"http://127.0.0.1:{port}/"
  t0 = time.time()
  while True:
    if proc.poll() is not None:
      pytest.fail(f"bagel-serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    try:
      with urllib.request.urlopen(url, timeout=5) as r:
        if r.status == 200:
          break
    except OSError:
      pass
    if time.time() - t0 > SERVER_START_S:
      proc.kill()
      pytest.fail(f"bagel-serve did not answer within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
    time.sleep(0.5)
  yield dict(url=url, proc=proc, workdir=workdir, bad=F.write_bad_inputs(str(d / "bad")), log=log_path)
  proc.terminate()
  try:
    proc.wait(20)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
  chromium = _chromium()
  sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extra) is missing")
  profile = tmp_path_factory.mktemp("chromium_profile")
  with sync_api.sync_playwright() as p:
    ctx = p.chromium.launch_persistent_context(str(profile), executable_path=chromium, headless=True,
                                               args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 960})
    pg = ctx.pages[0] if ctx.pages else ctx.new_page()
    pg.set_default_timeout(REQUEST_S * 1000)
    pg.goto(server["url"])
    pg.wait_for_selector("#und-run")
    yield pg
    ctx.close()


# ----------------------------------------------------------------------------------------------------------
# Page helpers.
# ----------------------------------------------------------------------------------------------------------

def _shoot(pg, tmp_path, name):
  path = tmp_path / f"serve_{name}.png"
  pg.screenshot(path=str(path), full_page=True)
  out = os.environ.get("BAGEL_SERVE_SCREENSHOTS")
  if out:
    os.makedirs(out, exist_ok=True)
    shutil.copy(path, os.path.join(out, path.name))
  assert path.stat().st_size > 10_000


def _tab(pg, name):
  pg.locator(f"#tab-{name}-button").click()


def _upload(pg, elem_id, path):
  pg.locator(f"#{elem_id} input[type=file]").set_input_files(path)
  pg.wait_for_selector(f"#{elem_id} img[src*='{os.path.basename(path)}']")


def _fill(pg, elem_id, text):
  pg.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first.fill(text)


def _number(pg, elem_id, value):
  box = pg.locator(f"#{elem_id} input[type=number]").first
  box.fill(str(value))
  box.press("Enter")
  box.blur()


def _watch(pg, elem_id):
  """Records every text the status line shows (window.__seen[elem_id]) and clears it for the next request."""
  pg.evaluate("""id => {
    window.__seen = window.__seen || {};
    window.__seen[id] = [];
    const el = document.getElementById(id);
    if (!el.__observed) {
      new MutationObserver(() => window.__seen[id].push(el.innerText)).observe(
          el, {childList: true, subtree: true, characterData: true});
      el.__observed = true;
    }
    el.__before = el.innerText;
  }""", elem_id)


def _status(pg, elem_id, want=("done", "answered", "loaded", "Error:")):
  """Waits until the status line (changed since `_watch`) starts with one of `want`; returns its text."""
  try:
    pg.wait_for_function("""([id, want]) => {
      const el = document.getElementById(id);
      const t = el.innerText.trim();
      return window.__seen[id].length > 0 && want.some(w => t.startsWith(w));
    }""", arg=[elem_id, list(want)])
  except Exception as e:  # pylint: disable=broad-except
    seen = pg.evaluate("id => window.__seen[id]", elem_id)
    pytest.fail(f"#{elem_id} never showed {want}: {type(e).__name__}; it showed {seen[-5:]}")
  return pg.locator(f"#{elem_id}").inner_text().strip()


def _image_stats(pg, elem_id):
  """(naturalWidth, naturalHeight, distinct pixel values) of the image shown in `elem_id`."""
  pg.wait_for_function("""id => { const im = document.querySelector(`#${id} img`);
                                  return im && im.complete && im.naturalWidth > 0; }""", arg=elem_id)
  return pg.evaluate("""id => {
    const im = document.querySelector(`#${id} img`);
    const c = document.createElement('canvas');
    c.width = im.naturalWidth; c.height = im.naturalHeight;
    const ctx = c.getContext('2d'); ctx.drawImage(im, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    return [im.naturalWidth, im.naturalHeight, seen.size];
  }""", elem_id)


# ----------------------------------------------------------------------------------------------------------
# The test.
# ----------------------------------------------------------------------------------------------------------

def test_page_in_a_browser(server, page, tmp_path):
  pg, src, bad = page, os.path.join(server["workdir"], "src.png"), server["bad"]

  # understand: an uploaded image and a question -> text
  _upload(pg, "und-image", src)
  _fill(pg, "und-question", "what color is the square ?")
  _number(pg, "und-max-tokens", 12)
  _watch(pg, "und-status")
  pg.locator("#und-run").click()
  assert _status(pg, "und-status").startswith("answered in")
  assert pg.locator("#und-answer textarea").input_value().strip()
  _shoot(pg, tmp_path, "understand")
  # ... a file that is not an image, then an empty question
  _upload(pg, "und-image", bad["not_image"])
  _watch(pg, "und-status")
  pg.locator("#und-run").click()
  assert "not an image file" in _status(pg, "und-status")
  _upload(pg, "und-image", src)
  _fill(pg, "und-question", "  ")
  _watch(pg, "und-status")
  pg.locator("#und-run").click()
  assert "question is empty" in _status(pg, "und-status")

  # generate at a requested size (not the default 32 x 32): a non-blank image of that size, step progress seen
  _tab(pg, "generate")
  _fill(pg, "gen-prompt", "a red circle left of a blue square")
  _number(pg, "gen-height", 48)
  _number(pg, "gen-width", 64)
  _number(pg, "gen-steps", 4)
  _watch(pg, "gen-status")
  pg.locator("#gen-run").click()
  status = _status(pg, "gen-status")
  assert status.startswith("done: 64x48 px, 3/3 denoising steps"), status
  seen = pg.evaluate("() => window.__seen['gen-status']")
  assert any(s.startswith("denoising step") for s in seen), seen
  w, h, colours = _image_stats(pg, "gen-image")
  assert (w, h) == (64, 48) and colours > 1
  _shoot(pg, tmp_path, "generate")
  _fill(pg, "gen-prompt", "")
  _watch(pg, "gen-status")
  pg.locator("#gen-run").click()
  assert "prompt is empty" in _status(pg, "gen-status")

  # edit: upload + instruction -> an image at the source's size; a huge image gets a message
  _tab(pg, "edit")
  _upload(pg, "edit-image", src)
  _fill(pg, "edit-instruction", "make the blue square red")
  _watch(pg, "edit-status")
  pg.locator("#edit-run").click()
  assert _status(pg, "edit-status").startswith("done: 32x32 px")
  assert _image_stats(pg, "edit-output")[:2] == [32, 32]
  _shoot(pg, tmp_path, "edit")
  _upload(pg, "edit-image", bad["huge"])
  _watch(pg, "edit-status")
  pg.locator("#edit-run").click()
  assert "megapixels" in _status(pg, "edit-status")

  # think: the reasoning, then the image
  _tab(pg, "think")
  _fill(pg, "think-prompt", "a red circle")
  _number(pg, "think-max-tokens", 12)
  _watch(pg, "think-status")
  pg.locator("#think-run").click()
  assert _status(pg, "think-status").startswith("done: 32x32 px")
  assert pg.locator("#think-reasoning textarea").input_value().strip()
  assert _image_stats(pg, "think-output")[:2] == [32, 32]
  _shoot(pg, tmp_path, "think")

  # checkpoint panel: step, tokens seen, loss curves, eval scores; another step; an unknown path
  _tab(pg, "checkpoint")
  info = pg.locator("#ckpt-info").inner_text()
  assert "200" in info and "819,200" in info  # step and tokens seen
  assert "vqa" in pg.locator("#ckpt-eval").inner_text()
  assert _image_stats(pg, "ckpt-curves")[0] > 100
  _shoot(pg, tmp_path, "checkpoint")
  _fill(pg, "ckpt-path", os.path.join(server["workdir"], "no_such_run"))
  _watch(pg, "ckpt-status")
  pg.locator("#ckpt-load").click()
  assert "cannot load checkpoint" in _status(pg, "ckpt-status")
  _fill(pg, "ckpt-path", server["workdir"])
  pg.locator("#ckpt-step input").fill("100")
  pg.locator("#ckpt-step input").press("Enter")
  _watch(pg, "ckpt-status")
  pg.locator("#ckpt-load").click()
  assert _status(pg, "ckpt-status").startswith("loaded step 100 (raw weights)")
  assert "step 100 (raw weights)" in pg.locator("#header").inner_text()

  assert server["proc"].poll() is None, server["log"].read_text()[-3000:]  # nothing above crashed it
