# Daily commands. Everything runs inside .venv, created on first use with only Python:
# MPI (mpirun/mpiexec) comes from the `mpich` wheel installed into the venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NP     ?= 4
RUN    ?= runs/train
ARGS   ?=
# One BLAS thread per rank: several ranks × several threads on the same cores is much slower.
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv train test lint figures bench course-check gpu-check clean

# One line per stage; pip itself prints nothing unless something fails (-qq keeps errors).
$(BIN)/activate: setup.cfg pyproject.toml
	@echo "make: creating $(VENV) with $$($(PYTHON) --version)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --disable-pip-version-check --upgrade pip
	@echo "make: installing mpipar with numpy, mpi4py, MPICH, pytest, ruff and matplotlib" \
	      "(a minute or two the first time)"
	@$(BIN)/pip install -qq --disable-pip-version-check -e '.[dev]'
	@echo "make: $(VENV) is ready"
	@touch $(BIN)/activate

venv: $(BIN)/activate

## train: NP processes of data parallelism on the built-in corpus; then text the model wrote
## and a report of the run in RUN/report.html (ARGS="--steps 50" adds flags to train.py)
train: venv
	@mkdir -p $(RUN)
	$(BIN)/mpirun -n $(NP) $(BIN)/python train.py --report $(RUN) --save $(RUN)/checkpoint $(ARGS)
	@echo "--- text the model wrote (python -m mpipar.sample --checkpoint $(RUN)/checkpoint)"
	@$(BIN)/python -m mpipar.sample --checkpoint $(RUN)/checkpoint -n 300 --top-k 10
	@echo "---"
	@echo "The report of this run, with its loss curves, communication and memory:" \
	      "$(RUN)/report.html (open it in a browser)"

## test: the whole test suite (unit, multi-process equivalence, tutorials, figures)
test: venv
	$(BIN)/python -m pytest

## lint: ruff over the package, scripts and tests
lint: venv
	$(BIN)/ruff check .

## figures: redraw the tutorials' figures into tutorials/figures/ (RETRACE=1 re-measures the
## pipeline traces they are drawn from first)
figures: venv
	$(BIN)/python -m mpipar.figures $(if $(RETRACE),--retrace)

## bench: throughput, MFU and parallel scaling figures (takes several minutes)
bench: venv
	$(BIN)/python bench/run_all.py

## course-check: the course proves itself: reference 100%, handouts 0, every lab caught (minutes)
course-check: venv
	$(BIN)/python -m mpipar.course check

## gpu-check: on a CUDA machine, installs cupy (the gpu extra) and checks mpipar on the GPU
## against the CPU (tests, train.py, mpirun dp/tp/pp) and its throughput; without a GPU it
## says so and checks nothing (ARGS="--cuda-aware" adds device buffers to MPI)
gpu-check: venv
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "make: installing the gpu extra (cupy)"; \
	  $(BIN)/pip install -qq --disable-pip-version-check -e '.[gpu]'; fi
	$(BIN)/python bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
