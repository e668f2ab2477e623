# The README's commands. `make demo`: the whole pipeline on the synthetic dataset, on a CPU, in ~15 minutes.
#   make venv    .venv with requirements.txt (only if .venv is missing)
#   make test    the test suite (as CI runs it)
#   make demo    synthetic data -> train configs/demo.toml -> evaluate its final EMA weights (LVIS AP table)
#   make demo-paste   the same run with the synthetic "generated" instance pool pasted in ([paste] enabled)
#   make demo-bsgal   ... and BSGAL selecting the pasted batches ([bsgal] enabled), then its report
#   make demo-generate   generate.py on CPU with tiny random-weight models: prompts -> images -> cut-outs -> pool
#   make demo-toy    BSGAL's CIFAR-10 contribution experiment (A.6) on a synthetic stand-in, CPU, under a minute
#   make lint    ruff check + ruff format --check

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_CONFIG := configs/demo.toml
DEMO_DATA := data/synthetic
DEMO_OUTPUT := output/demo
DEMO_PASTE_OUTPUT := output/demo_paste
DEMO_BSGAL_OUTPUT := output/demo_bsgal

.PHONY: venv test demo demo-paste demo-bsgal demo-data demo-generate demo-toy lint

venv: $(PY)

# A failed install removes the half-made venv, so the next `make` starts over instead of skipping it.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt || { rm -rf $(VENV); exit 1; }

test: venv
	$(PY) -m pytest

# One torch thread: on 2 cores the other one serves the data-loader worker, and OpenMP threads that share a core
# with any other busy process spin and wait: a demo step took 9.5 s with 2 threads beside another job, 1.5 s with 1.
# `make demo DEMO_THREADS=4` on a machine with more idle cores.
DEMO_THREADS ?= 1

# --weights $(DEMO_OUTPUT): the run's latest checkpoint (the final one), EMA weights preferred.
demo: demo-data
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) train.py --config $(DEMO_CONFIG) --set train.output_dir=$(DEMO_OUTPUT)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) evaluate.py --config $(DEMO_CONFIG) --weights $(DEMO_OUTPUT) \
		--output $(DEMO_OUTPUT)/inference

demo-paste: demo-data
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) train.py --config $(DEMO_CONFIG) --set paste.enabled=true \
		--set train.output_dir=$(DEMO_PASTE_OUTPUT)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) evaluate.py --config $(DEMO_CONFIG) --weights $(DEMO_PASTE_OUTPUT) \
		--output $(DEMO_PASTE_OUTPUT)/inference

demo-bsgal: demo-data
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) train.py --config $(DEMO_CONFIG) --set paste.enabled=true \
		--set bsgal.enabled=true --set bsgal.gallery_period=20 --set train.output_dir=$(DEMO_BSGAL_OUTPUT)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) evaluate.py --config $(DEMO_CONFIG) --weights $(DEMO_BSGAL_OUTPUT) \
		--output $(DEMO_BSGAL_OUTPUT)/inference
	$(PY) -m divergen.bsgal report $(DEMO_BSGAL_OUTPUT)

# The dataset and its "generated" instance pool (40 cutouts per category, 30% corrupted); kept if up to date.
demo-data: venv
	$(PY) -m divergen.synthetic --root $(DEMO_DATA) --pool-per-category 40

# The generation chain on the synthetic dataset's categories; the models are seeded random stand-ins.
demo-generate: demo-data
	$(PY) -m divergen.tiny_models --root data/tiny_models
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) generate.py --config configs/generate_demo.toml

demo-toy: venv
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m divergen.toy --config configs/toy_demo.toml

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
