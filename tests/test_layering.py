"""The package's import directions, read from the source (no imports executed).

Layers, bottom to top (docs/architecture.md); a module may import its own layer and lower ones:
  0  bagel_jax.parallel, bagel_jax.accelerators, bagel_jax.console, bagel_jax.plots (no project imports)
  1  bagel_jax.kernels
  2  bagel_jax.batch, bagel_jax.layout
  3  bagel_jax.models
  4  bagel_jax.data
  5  bagel_jax.train, bagel_jax.inference, bagel_jax.eval, bagel_jax.convert, bagel_jax.checkpoint
  6  tools: bagel_jax.aot, bagel_jax.serve, bagel_jax.demo and every `cli` module
  7  experiments/ (never imported by bagel_jax), benchmarks/, tests/
A function-local import of a project module must say why on its line (or the line above), e.g. "keeps
Pallas out of CPU-only imports"; a bare `# pylint: disable=import-outside-toplevel` is not a reason. Files
longer than 400 lines must say why in their module docstring ("over 400 lines: <reason>").
"""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {
    "bagel_jax": 0, "bagel_jax.parallel": 0, "bagel_jax.accelerators": 0, "bagel_jax.console": 0,
    "bagel_jax.plots": 0,
    "bagel_jax.kernels": 1,
    "bagel_jax.batch": 2, "bagel_jax.layout": 2,
    "bagel_jax.models": 3,
    "bagel_jax.data": 4,
    "bagel_jax.train": 5, "bagel_jax.inference": 5, "bagel_jax.eval": 5, "bagel_jax.convert": 5,
    "bagel_jax.checkpoint": 5,
    "bagel_jax.aot": 6, "bagel_jax.serve": 6, "bagel_jax.demo": 6,
    "experiments": 7,
}
MAX_LINES = 400


def layer_of(module: str) -> int:
  if module.rsplit(".", 1)[-1] == "cli" or module.endswith(".__main__"):
    return 6
  best = None
  for prefix, layer in LAYERS.items():
    if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
      best = (prefix, layer)
  if best is None:
    raise AssertionError(f"{module}: not in the layer table of tests/test_layering.py (add it)")
  return best[1]


def package_modules():
  out = {}
  for dirpath, _, files in os.walk(os.path.join(REPO, "bagel_jax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        mod = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
  return out


def project_imports(path: str):
  """(imported module, line, function-local?) for every import of bagel_jax / experiments in the file."""
  tree = ast.parse(open(path).read())
  local = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      local.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module]
    for name in names:
      if name.split(".")[0] in ("bagel_jax", "experiments"):
        yield name, node.lineno, id(node) in local


def _reason(lines, lineno: int) -> str:
  """The comment text on the import's line or the line above, without lint directives."""
  text = []
  for line in (lines[lineno - 1], lines[lineno - 2] if lineno > 1 else ""):
    if "#" in line:
      comment = line.split("#", 1)[1]
      comment = re.sub(r"(pylint:\s*disable=[\w\-,]+|noqa(:\s*[\w,]+)?)", "", comment)
      text.append(comment.replace("#", " ").strip(" :()"))
  return " ".join(t for t in text if t)


MODULES = package_modules()


def test_every_module_has_a_layer():
  for mod in MODULES:
    layer_of(mod)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
  mine = layer_of(mod)
  lines = open(MODULES[mod]).read().splitlines()
  for name, lineno, local in project_imports(MODULES[mod]):
    assert not name.startswith("experiments"), f"{mod}:{lineno} imports {name}: the package never imports experiments"
    assert layer_of(name) <= mine, (f"{mod}:{lineno} (layer {mine}) imports {name} (layer {layer_of(name)}): "
                                   "lower layers never import higher ones")
    if local:
      assert len(_reason(lines, lineno).split()) >= 3, (
          f"{mod}:{lineno}: function-local import of {name} without a stated reason (move it to the top, or say "
          "why on its line)")


def test_the_checks_catch_what_they_are_for(tmp_path):
  """The parser sees upward, experiments and unexplained local imports (so the tests above can fail)."""
  p = tmp_path / "m.py"
  p.write_text("import bagel_jax.train.step\n"
               "def f():\n"
               "  from bagel_jax.models import bagel  # pylint: disable=import-outside-toplevel\n"
               "  from bagel_jax.data import pipeline  # keeps grain out of the import\n"
               "  import experiments.common\n")
  got = list(project_imports(str(p)))
  assert got == [("bagel_jax.train.step", 1, False), ("bagel_jax.models", 3, True), ("bagel_jax.data", 4, True),
                 ("experiments.common", 5, True)]
  lines = p.read_text().splitlines()
  assert _reason(lines, 3) == "" and _reason(lines, 4).startswith("keeps grain")
  assert layer_of("bagel_jax.train.step") == 5 > layer_of("bagel_jax.models.bagel") == 3
  assert layer_of("bagel_jax.train.cli") == 6 and layer_of("experiments.common") == 7


def _long_files():
  for top in ("bagel_jax", "experiments", "benchmarks", "tests"):
    for dirpath, _, files in os.walk(os.path.join(REPO, top)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          n = sum(1 for _ in open(path))
          if n > MAX_LINES:
            yield os.path.relpath(path, REPO), n


@pytest.mark.parametrize("path,n", sorted(_long_files()))
def test_long_files_say_why(path, n):
  doc = ast.get_docstring(ast.parse(open(os.path.join(REPO, path)).read())) or ""
  assert re.search(r"over 400 lines:\s*\S", doc), (f"{path} has {n} lines: split it, or state the reason in its "
                                                  "module docstring ('over 400 lines: ...')")
