# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build of 2.13.0 is on local disk here; an unpinned torch would pull a CUDA build.
# The demo ends by serving the model over HTTP, so it installs the `serve` extra (fastapi, uvicorn).
$(VENV)/.core: $(PY) pyproject.toml constraints.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[serve]"
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(PY) examples/demo.py --out demo-out

test: $(VENV)/.dev
	$(PY) -m pytest -q

clean:
	rm -rf demo-out .pytest_cache
