"""Load check of `bagel-serve`: N concurrent requests from the loopback interface, all answered, none lost or
mixed up, the server's memory flat.

  python benchmarks/serve_load.py [--clients 16] [--rounds 6] [--checkpoint DIR] [--steps 6]

Starts `python -m bagel_jax.serve` on a free 127.0.0.1 port (over DIR, or a tiny random-weight checkpoint made
in a temp dir), then:
1. reference: each distinct request (understand / generate at three sizes / edit / think, and one bad request
   with an empty prompt) once, serially, through the same HTTP API; the server's RSS after this is the baseline;
2. rounds: `--clients` threads, each with its own Gradio client (one page session, kept across rounds like an
   open browser tab; `--fresh-sessions`: a new session per request), send one request each at the same moment
   (a mix of the kinds above); every answer must equal the serial reference of its request (same text, the same
   image bytes and size, the same error message), so a lost, duplicated or crossed answer fails the check.
   The server's RSS is sampled after every round.
Prints a table per round (answered / lost / wrong, latency percentiles, queue wait, RSS) and writes
benchmarks/results/serve_load.json. Exits non-zero when a request is lost or wrong or the RSS grows by more than
--max-growth-mib between the first and the last round. Only loopback traffic; bounded in count and time.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
for _k in ("NO_PROXY", "no_proxy"):
  os.environ[_k] = ",".join(x for x in (os.environ.get(_k, ""), "127.0.0.1,localhost") if x)


def make_checkpoint(d: str) -> str:
  """A tiny random-weight run (the shapes of `make demo`'s model) and a source image."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from bagel_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.inference import model as model_lib  # pylint: disable=import-outside-toplevel
  from bagel_jax.models import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.tiny("mot")
  ckpt_lib.save_params(os.path.join(d, "checkpoints"), model_lib.random_params(cfg, seed=4), cfg, step=1)
  img = np.full((32, 32, 3), 128, np.uint8)
  img[8:24, 8:24] = (20, 60, 230)
  Image.fromarray(img).save(os.path.join(d, "src.png"))
  return d


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(checkpoint: str, port: int, steps: int, log_path: str) -> subprocess.Popen:
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, "-m", "bagel_jax.serve", "--checkpoint", checkpoint, "--port", str(port),
                           "--default-steps", str(steps)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                          env=dict(os.environ, GRADIO_TEMP_DIR=os.path.join(os.path.dirname(log_path), "gradio")))
  t0 = time.time()
  while time.time() - t0 < 300:
    if proc.poll() is not None:
      raise SystemExit(f"server exited with {proc.returncode}: see {log_path}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        if r.status == 200:
          return proc
    except OSError:
      time.sleep(0.5)
  proc.kill()
  raise SystemExit(f"server did not answer within 300 s: see {log_path}")


def rss_mib(pid: int) -> float:
  import psutil  # pylint: disable=import-outside-toplevel
  return psutil.Process(pid).memory_info().rss / 2**20


# ----------------------------------------------------------------------------------------------------------
# Requests.
# ----------------------------------------------------------------------------------------------------------

def request_specs(src: str, steps: int):
  """(name, api_name, args) of the distinct requests; the sampler args as the page sends them."""
  t2i = [steps, 4.0, 1.0, 0.4, 1.0, 3.0, "global", 0.0]
  edit = [steps, 4.0, 2.0, 0.0, 1.0, 3.0, "text_channel", 0.0]
  return [
      ("understand", "/understand", ["IMAGE", "what color is the square ?", False, 8, False, 0.3, 0]),
      ("generate_32x32", "/generate", ["a red circle", 32, 32, 1] + t2i),
      ("generate_48x64", "/generate", ["two blue squares", 48, 64, 2] + t2i),
      ("generate_64x40", "/generate", ["a green star", 64, 40, 3] + t2i),
      ("edit", "/edit", ["IMAGE", "make the square red", 4] + edit),
      ("think", "/think", ["a red circle", None, 6, 32, 32, 5] + t2i),
      ("empty_prompt", "/generate", ["", 32, 32, 0] + t2i),
  ]


def digest(result) -> str:
  """A comparable fingerprint of an answer: texts as they are, images by size and pixel hash."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  parts = []
  for x in (result if isinstance(result, (list, tuple)) else [result]):
    if isinstance(x, str) and os.path.isfile(x):
      a = np.asarray(Image.open(x).convert("RGB"))
      parts.append(f"image{a.shape[1]}x{a.shape[0]}:{hashlib.sha1(a.tobytes()).hexdigest()[:12]}")
    elif isinstance(x, str):
      # the status line without its timing: "done: 32x32 px, 5/5 denoising steps, 0.1 s" / "answered in 0.1 s"
      parts.append(x.split(", ")[0] if x.startswith("done:") else "answered" if x.startswith("answered in") else x)
    else:
      parts.append(repr(x))
  return " | ".join(parts)


def client_for(url: str, download_dir: str):
  """A Gradio client: one page session (the Python counterpart of an open browser tab)."""
  from gradio_client import Client  # pylint: disable=import-outside-toplevel
  return Client(url, verbose=False, analytics_enabled=False, download_files=download_dir,
                httpx_kwargs=dict(timeout=120))


def call(client, spec, src: str):
  """One request: (digest, seconds)."""
  from gradio_client import handle_file  # pylint: disable=import-outside-toplevel
  _, api, args = spec
  args = [handle_file(src) if a == "IMAGE" else a for a in args]
  t0 = time.time()
  out = client.predict(*args, api_name=api)
  return digest(out), time.time() - t0


def percentile(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", default=None, help="workdir to serve (default: a tiny random-weight one)")
  ap.add_argument("--image", default=None, help="source image for understand/edit (default: the tiny run's)")
  ap.add_argument("--clients", type=int, default=16, help="concurrent requests per round")
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--steps", type=int, default=6, help="schedule points per image request")
  ap.add_argument("--timeout", type=float, default=600, help="seconds a round may take")
  ap.add_argument("--max-growth-mib", type=float, default=64.0, help="RSS growth first -> last round that fails")
  ap.add_argument("--fresh-sessions", action="store_true", help="a new client session for every request (default: "
                  "one session per client, kept across rounds, like open pages)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "serve_load.json"))
  args = ap.parse_args(argv)
  if not (1 <= args.clients <= 64 and 1 <= args.rounds <= 50):
    ap.error("--clients must be 1..64 and --rounds 1..50 (a bounded check)")
  tmp = tempfile.mkdtemp(prefix="serve_load_")
  ckpt = args.checkpoint or make_checkpoint(os.path.join(tmp, "run"))
  src = args.image or os.path.join(ckpt, "src.png")
  port = free_port()
  url = f"http://127.0.0.1:{port}/"
  t0 = time.time()
  proc = start_server(ckpt, port, args.steps, os.path.join(tmp, "server.log"))
  startup = time.time() - t0
  specs = request_specs(src, args.steps)
  try:
    ref, ref_s = {}, {}
    t0 = time.time()
    serial = client_for(url, os.path.join(tmp, "dl", "serial"))
    for spec in specs:  # serial: compiles every kind, and the answers every round must reproduce
      ref[spec[0]], ref_s[spec[0]] = call(serial, spec, src)
    reference_s = time.time() - t0
    clients = [client_for(url, os.path.join(tmp, "dl", str(i))) for i in range(args.clients)]
    baseline = rss_mib(proc.pid)
    rounds = []
    pool = cf.ThreadPoolExecutor(args.clients)
    for r in range(args.rounds):
      mix = [specs[(r + i) % len(specs)] for i in range(args.clients)]
      if args.fresh_sessions:  # every request from a new session (a new page load)
        clients = [client_for(url, os.path.join(tmp, "dl", f"{r}_{i}")) for i in range(args.clients)]
      t0 = time.time()
      futs = {pool.submit(call, clients[i], spec, src): spec[0] for i, spec in enumerate(mix)}
      answered, wrong, lat, problems = 0, 0, [], []
      done, pending = cf.wait(futs, timeout=args.timeout)
      for f in done:
        name = futs[f]
        try:
          d, s = f.result()
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"{name}: {type(e).__name__}: {e}")
          continue
        answered += 1
        lat.append(s)
        if d != ref[name]:
          wrong += 1
          problems.append(f"{name}: answer differs from the serial reference: {d[:200]} vs {ref[name][:200]}")
      wall = time.time() - t0
      rounds.append(dict(round=r + 1, sent=len(mix), answered=answered, lost=len(mix) - answered, wrong=wrong,
                         wall_s=round(wall, 3), p50_s=round(percentile(lat, 0.5), 3),
                         p95_s=round(percentile(lat, 0.95), 3), max_s=round(max(lat, default=float("nan")), 3),
                         requests_per_s=round(answered / wall, 2), rss_mib=round(rss_mib(proc.pid), 1),
                         problems=problems[:5]))
      for f in pending:
        f.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    alive = proc.poll() is None
  finally:
    proc.terminate()
    try:
      proc.wait(20)
    except subprocess.TimeoutExpired:
      proc.kill()

  growth = rounds[-1]["rss_mib"] - rounds[0]["rss_mib"]
  total = sum(x["sent"] for x in rounds)
  ok = (all(x["lost"] == 0 and x["wrong"] == 0 for x in rounds) and alive and growth <= args.max_growth_mib)
  head = f"{'round':>5} {'sent':>4} {'answered':>8} {'lost':>4} {'wrong':>5} {'wall s':>7} {'p50 s':>6} " \
         f"{'p95 s':>6} {'max s':>6} {'req/s':>6} {'RSS MiB':>8}"
  print(f"bagel-serve load check: {args.clients} concurrent clients x {args.rounds} rounds on {url} "
        f"({args.steps}-point schedules; server start {startup:.1f} s, serial reference of {len(specs)} request "
        f"kinds {reference_s:.1f} s incl. compilation; RSS after it {baseline:.1f} MiB)")
  print(head)
  for x in rounds:
    print(f"{x['round']:>5} {x['sent']:>4} {x['answered']:>8} {x['lost']:>4} {x['wrong']:>5} {x['wall_s']:>7.2f} "
          f"{x['p50_s']:>6.2f} {x['p95_s']:>6.2f} {x['max_s']:>6.2f} {x['requests_per_s']:>6.1f} {x['rss_mib']:>8.1f}")
    for p in x["problems"]:
      print(f"      ! {p}")
  print(f"{total} requests, {sum(x['answered'] for x in rounds)} answered, {sum(x['lost'] for x in rounds)} lost, "
        f"{sum(x['wrong'] for x in rounds)} differing from the serial answer; RSS {rounds[0]['rss_mib']:.1f} -> "
        f"{rounds[-1]['rss_mib']:.1f} MiB ({growth:+.1f}) over rounds; server {'alive' if alive else 'DEAD'}: "
        f"{'PASS' if ok else 'FAIL'}")
  import jax  # pylint: disable=import-outside-toplevel
  import gradio  # pylint: disable=import-outside-toplevel
  report = dict(
      host=dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__, gradio=gradio.__version__),
      checkpoint=args.checkpoint or "tiny random-weight MoT (bagel_jax.models.config.tiny), made by the script",
      clients=args.clients, rounds_n=args.rounds, schedule_points=args.steps, fresh_sessions=args.fresh_sessions,
      request_kinds={name: dict(api=api, reference=ref[name], serial_s=round(ref_s[name], 3))
                     for name, api, _ in specs},
      server_start_s=round(startup, 2), reference_s=round(reference_s, 2), rss_baseline_mib=round(baseline, 1),
      rounds=rounds, rss_growth_mib=round(growth, 1), max_growth_mib=args.max_growth_mib, server_alive=alive,
      passed=ok)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
