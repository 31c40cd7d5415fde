"""The README's "Your own data" section runs as written (issue #15).

Default run: the data commands run exactly as written (manifest example folder, manifest, tokenizer) and each
`bagel-train` command's `--config` loads through `config_flags` as bagel-train parses it. Slow: the whole block,
as written, in a shell (trains the VAE and the model, samples)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()], block


def _workspace(tmp_path):
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")  # config paths are repo-relative
  return tmp_path


def test_readme_own_data_commands(tmp_path):
  from absl import flags
  from ml_collections import config_flags
  cmds, _ = readme_commands()
  assert [c.split()[0] for c in cmds] == ["python"] * 3 + ["bagel-train"] * 2 + ["bagel-sample"]
  ws = _workspace(tmp_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for c in cmds[:3]:
    argv = shlex.split(c.split("#")[0])
    p = subprocess.run([sys.executable] + argv[1:], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (c, p.stderr[-2000:])
  assert (ws / "workdirs/example_data/t2i_heldout.jsonl").exists()
  assert (ws / "workdirs/example_data/tokenizer.json").exists()
  os.makedirs(ws / "workdirs/example_vae/checkpoints")  # the t2i config checks that its vae= path exists
  cwd = os.getcwd()
  try:
    os.chdir(ws)
    for c in cmds[3:5]:
      argv = ["bagel-train"] + shlex.split(c)[1:]
      fv = flags.FlagValues()
      holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
      flags.DEFINE_string("workdir", None, "", flag_values=fv)
      fv(argv)
      cfg = holder.value
      assert cfg.train.steps in (300, 200) and fv["workdir"].value.startswith("workdirs/example_")
      if cfg.get("recipe") != "vae":
        assert cfg.init.vae.endswith("workdirs/example_vae") and cfg.data.tokenizer.endswith("tokenizer.json")
  finally:
    os.chdir(cwd)


@pytest.mark.slow
def test_readme_own_data_block_runs_as_written(tmp_path):
  _, block = readme_commands()
  ws = _workspace(tmp_path)
  bin_dir = os.path.dirname(sys.executable)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
  p = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace("python ", f"{sys.executable} ")],
                     cwd=ws, env=env, capture_output=True, text=True, timeout=3600)
  assert p.returncode == 0, p.stderr[-5000:]
  assert (ws / "workdirs/example_t2i/sample.png").exists()
  assert (ws / "workdirs/example_vae/recon_grid.png").exists()
