# Daily commands. Everything runs inside .venv, created on first use with only Python:
# MPI (mpirun/mpiexec) comes from the `mpich` wheel installed into the venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NP     ?= 4
# One BLAS thread per rank: several ranks × several threads on the same cores is much slower.
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv train test lint bench course-check clean

$(BIN)/activate: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[dev]'
	touch $(BIN)/activate

venv: $(BIN)/activate

## train: NP processes of data parallelism on the built-in corpus
train: venv
	$(BIN)/mpirun -n $(NP) $(BIN)/python train.py

## test: the whole test suite (unit, multi-process equivalence, tutorials)
test: venv
	$(BIN)/python -m pytest

## lint: ruff over the package, scripts and tests
lint: venv
	$(BIN)/ruff check .

## bench: throughput, MFU and parallel scaling figures (takes several minutes)
bench: venv
	$(BIN)/python bench/run_all.py

## course-check: the course proves itself: reference 100%, handouts 0, every lab caught (minutes)
course-check: venv
	$(BIN)/python -m mpipar.course check

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
