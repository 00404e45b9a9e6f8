# Two entry points: `make test` and `make demo`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-browser browser-deps lint format demo venv clean-venv bench flops

venv: $(STAMP)

# torch is pinned: an unpinned torch pulls GBs of CUDA wheels. torch-fidelity goes in with --no-deps: its
# torchvision requirement is left out (PyPI's torchvision does not import beside a +cpu torch; far eval needs none of it).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" onnx onnxruntime numpy pillow safetensors tqdm pytest scikit-learn jsonschema "ray[serve]>=2.40" scipy "transformers>=5" "tokenizers>=0.20" "huggingface_hub>=1.0" "ruff==0.17.6" "fastapi>=0.110" "pydantic>=2.5" "selenium>=4.20"
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Lint and format checks first (ruff, configured in pyproject.toml), then the suite (the browser tests are
# `make test-browser`). pytest exits 5 when it collects no tests: treat that as a failure, never as green.
test: lint
	@$(PY) -m pytest -q -m "not browser"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The playground page in a real browser: Debian's chromium + chromedriver (Playwright's own browser download does
# not work here), installed when missing (apt, as root); FAR_REQUIRE_BROWSER=1 turns a missing browser into a failure.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
browser-deps:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		echo "installing chromium and chromium-driver (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test-browser: $(STAMP) browser-deps
	@FAR_REQUIRE_BROWSER=1 $(PY) -m pytest -q -m browser; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-browser: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(STAMP)
	$(PY) examples/demo.py

flops: $(STAMP)
	$(PY) scripts/model_stats.py

clean-venv:
	rm -rf $(VENV)
