# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CONFIG  ?= config.yaml
# A machine with an NVIDIA GPU gets CUDA torch + faiss-gpu; any other the CPU build (see NOTES: a bare
# `torch` pulls a multi-GB CUDA build, so the CPU one is pinned and installed first).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH   := $(if $(HAS_GPU),torch,torch==2.13.0)
FLAVOUR := $(if $(HAS_GPU),gpu,cpu)
STAMP   := $(VENV)/.installed-$(FLAVOUR)
# the test tools (pytest, moto's S3 server, ...) only where tests run: `make demo` does not wait for them
TESTS   := $(VENV)/.installed-$(FLAVOUR)-test

.PHONY: install demo test test-fast bench scale chaos data clean-data versions

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# pin the torch just installed: resolving the extras must not swap the CPU build for a CUDA one
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e ".[$(FLAVOUR)]"
	touch $@

$(TESTS): $(STAMP)
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e ".[$(FLAVOUR),test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/fct upgrade --config $(CONFIG)

# three model versions on the demo data in their own root: old (10 classes) -> new (15) -> v3 (all 20),
# the second upgrade both chained and direct (a longer versions.classes list upgrades further, same code)
versions: $(STAMP)
	$(VENV)/bin/fct upgrade --config $(CONFIG) --set storage.root=./fct-data-versions \
		--set "versions.classes=[15, null]"

data: $(STAMP)
	$(VENV)/bin/fct data --config $(CONFIG)

# everything (CI), on two pytest-xdist workers, a module at a time in conftest's order: Ray's start-ups and
# waits of one overlap the other's work (README, Development: the times)
test: $(TESTS)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# the tier to run while working: unit and local-engine tests, no S3 server, no trained session, no cluster
test-fast: $(TESTS)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=10 -m "not slow and not s3 and not cluster and not gpu" tests

bench: $(STAMP)
	$(VENV)/bin/fct bench --config $(CONFIG)

# tens of millions of rows through backfill, IVF-PQ index and search (bench.scale; ~45 GB of disk at 25M rows)
scale: $(STAMP)
	$(VENV)/bin/fct bench --profile scale --config $(CONFIG)

# the fault soak: S3 faults through a proxy, killed actors and drivers, the bad-input table; ends with figures
chaos: $(TESTS)
	$(PY) -m tests.harness.chaos --rounds 3
