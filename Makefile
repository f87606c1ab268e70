# Setup wrapper: `make run` and `make test` create .venv when it is missing and install what is
# missing (a working torch/torchvision pair, then seit in editable mode). A second call installs
# nothing: the stamp is newer than setup.cfg, pyproject.toml and constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seit-installed
ARGS ?=

.PHONY: setup run test test-unit clean-cache
setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@$(PY) -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

# Two pytest workers (pytest-xdist), one test file each at a time: most tests spend their time in
# single-threaded run.py subprocesses, so two run side by side on CI's two cores.
test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest tests -q -n 2 --dist loadfile

test-unit: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest tests -q -m "not integration"

clean-cache:
	rm -rf data_cache logs
