# Two commands matter: `make demo` and `make test`. Both build .venv on first use, with every extra
# (`.[all,dev]`) at the exact versions of constraints.txt.
# `make test-fast` (lint, typecheck, then the tests that start no process: about 3 minutes on 2 cores) is the loop
# while editing; `make test` runs everything it always did. A test that starts processes or servers is marked
# `process` (tests/conftest.py: by hand, or through a fixture decorated with `starts_processes`); in the fast tier
# an unmarked test that starts one fails and says so.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run in this many processes (pytest-xdist, a file's tests together in one): most tests wait on agents
# and servers, and a single process kept 2 cores only a third busy. PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: demo test test-fast lint typecheck unit unit-fast test-slow browser-deps system-deps aarch64-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[all,dev]'
	# Real pretrained models shipped inside wheels: Silero VAD (ONNX) and MediaPipe's face detector (.tflite, for
	# the LiteRT tests). Their runtime deps (torch, mediapipe's) are not needed to read the model files, so they
	# are installed without them; nothing imports them.
	$(BIN)/pip install -q --no-deps -c constraints.txt silero-vad mediapipe
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgefleet demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) browser-deps system-deps
	$(BIN)/pytest -m "not slow" $(XDIST) --durations=25 $(PYTEST_ARGS)

test: lint typecheck unit

unit-fast: $(STAMP)
	$(BIN)/pytest -m "not slow and not process" $(XDIST) --durations=15 $(PYTEST_ARGS)

test-fast: lint typecheck unit-fast

test-slow: $(STAMP) aarch64-deps
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# Debian's Chromium for the dashboard's browser tests (test tools cannot download browsers here).
browser-deps:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

# Debian's packages the tests run for real: promtool (prometheus) checks and unit-tests deploy/prometheus/
# (tests/test_alerts.py); nginx terminates TLS in front of the server in the recipe of docs/security/tls.md;
# haproxy balances two replicas (deploy/haproxy, tests/test_scale_out.py).
system-deps:
	(command -v promtool && command -v nginx && command -v haproxy) >/dev/null || \
		(apt-get update -q && apt-get install -y -q prometheus nginx haproxy)

# An arm64 device under emulation (tests/test_aarch64_qemu.py): qemu-user-static and mmdebstrap from Debian, and
# qemu's aarch64 handler in the kernel's binfmt_misc. Registering needs root and a kernel that allows it; where it
# is refused (`-`: make goes on) the test skips and says which step is missing.
aarch64-deps:
	(command -v mmdebstrap && test -e /usr/lib/binfmt.d/qemu-aarch64.conf) >/dev/null || \
		(apt-get update -q && apt-get install -y -q qemu-user-static mmdebstrap)
	-test -e /proc/sys/fs/binfmt_misc/register || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	-test -e /proc/sys/fs/binfmt_misc/qemu-aarch64 || \
		grep '^:' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
