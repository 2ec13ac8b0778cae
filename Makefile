# Two entry points, both doing all set-up on a fresh machine:
#   make demo   install, run a quick study on the real images, then serve the dashboard
#   make test   install (plus Chromium for the browser tests) and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5006

.PHONY: install demo study dashboard test browser clean gpu-carry

install: $(VENV)/.installed

# torch/torchvision first (pip takes them from local disk where the machine has them), then basicsr
# without build isolation: its setup.py imports torch, and an isolated build would fetch another torch.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel cython
	$(BIN)/pip install -q "torch>=2.2,<2.15" "torchvision>=0.17,<0.30" numpy
	$(BIN)/pip install -q --no-build-isolation basicsr==1.4.2
	$(BIN)/pip install -q -e '.[test]'
	touch $@

study: install
	$(BIN)/wbc study --preset quick

dashboard: install
	$(BIN)/panel serve dashboard --address 127.0.0.1 --port $(PORT) --allow-websocket-origin 127.0.0.1:$(PORT) --allow-websocket-origin localhost:$(PORT)

demo: study dashboard

# Debian's Chromium drives the browser tests (never `playwright install`: it downloads a browser).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: install browser
	$(BIN)/python -m pytest -q tests

# What benchmarks/gpu_check.sh needs on a GPU machine without network or ../shared (docs/SCALING.md).
gpu-carry: install
	$(BIN)/python benchmarks/gpu_carry.py

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
