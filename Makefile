# Two entry points: `make test` and `make demo`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint format demo venv clean-venv bench flops

venv: $(STAMP)

# torch is pinned: an unpinned torch pulls GBs of CUDA wheels. torch-fidelity goes in with --no-deps: its
# torchvision requirement is left out (PyPI's torchvision does not import beside a +cpu torch; far eval needs none of it).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" onnx onnxruntime numpy pillow safetensors tqdm pytest scikit-learn jsonschema "ray[serve]>=2.40" scipy "transformers>=5" "tokenizers>=0.20" "huggingface_hub>=1.0" "ruff==0.17.6"
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Lint and format checks first (ruff, configured in pyproject.toml), then the suite.
# pytest exits 5 when it collects no tests: treat that as a failure, never as green.
test: lint
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

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
