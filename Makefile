# Two commands matter: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit test-slow browser-deps clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[demo,dev]'
	# A real pretrained ONNX model shipped inside a wheel (Silero VAD). Its runtime deps (torch) are not
	# needed to read the .onnx file, so it is installed without them.
	$(BIN)/pip install -q --no-deps silero-vad==6.2.3
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgefleet demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) browser-deps
	$(BIN)/pytest -m "not slow" --durations=25 $(PYTEST_ARGS)

test: lint typecheck unit

test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# Debian's Chromium for the dashboard's browser tests (test tools cannot download browsers here).
browser-deps:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
