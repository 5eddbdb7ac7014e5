# ddpzero_lab: two commands.
#   make lab    set up .venv if needed, open JupyterLab on notebooks/
#   make test   set up .venv if needed, run tests/ and execute every notebook (smoke sizes)
#   make book   the course as a static site (build/book/_build/html), from executed notebooks

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ddpzero-installed
LAB_ARGS ?=
PYTEST_ARGS ?=

.PHONY: lab test venv lint format bench clean book screenshot words

venv: $(STAMP)

# pip, not uv: pip honours the machine's own pip configuration (a local wheel mirror, version
# caps), and on a learner's machine it picks the torch build that fits (CUDA on Linux, MPS or
# CPU on macOS). torch and torchvision are installed in one resolve so that they match.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev,lab]'
	$(BIN)/python -c "import torch, torchvision; m = torchvision.models.resnet18(); m(torch.randn(2, 3, 32, 32)).sum().backward(); print('torch', torch.__version__, 'torchvision', torchvision.__version__, ': resnet18 forward+backward ok')"
	@touch $(STAMP)

# Loopback only: the lab runs code, so it is not offered to the network. Jupyter refuses to run
# as root without --allow-root (containers, CI); it is added only in that case.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks --ip=127.0.0.1 $(ROOT_FLAG) $(LAB_ARGS)

# One pytest run: the unit and fault tests, then every notebook run as Run All does, with the
# exercises' solutions (each self-check must PASS) and as shipped (each must FAIL), in smoke
# sizes; the executed notebooks become the static site, which a browser then opens.
test: $(STAMP)
	$(BIN)/python scripts/course_words.py --check
	DDPZERO_SMOKE=1 $(BIN)/python -m pytest tests $(PYTEST_ARGS)

words: $(STAMP)
	$(BIN)/python scripts/course_words.py

# The site: notebooks executed in smoke mode with the solutions (reused from `make test` when
# build/executed/ is newer than the notebooks), then jupyter-book, offline.
book: $(STAMP)
	$(BIN)/python scripts/build_book.py

# The README's picture of the dashboard, from a real browser (needs Chromium).
screenshot: $(STAMP)
	$(BIN)/python scripts/refresh_screenshot.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/cluster_startup.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
