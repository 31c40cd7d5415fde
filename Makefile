# The two set-up commands of the README. Each creates (or reuses) ./.venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-8)
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-all install browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,torch]'
	touch $@

install: $(STAMP)

# Main job: train a tiny BAGEL on the built-in synthetic data on CPU, writing checkpoints, curves and samples.
demo: install
	$(BIN)/python -m bagel_jax.demo --workdir workdirs/demo

# Headless Chromium from Debian for the bagel-serve browser test (needs root; without it that test skips, saying so).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	  >/dev/null 2>&1 || echo "chromium could not be installed: the bagel-serve browser test will be skipped"

# Default test suite: fast tests plus one representative of every slow kind (aot, multi-process, ...).
test: install browser
	$(BIN)/python -m pytest -m "not slow or smoke" -q

# Everything, slow tests included.
test-all: install browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) workdirs .pytest_cache
