"""One BLAS thread per rank under mpirun, unless the user chose otherwise.

Several ranks each starting several BLAS threads on the same cores slow each other down many
times over. The thread count is read when numpy loads, so a command line imports this module
before numpy (`train.py`, `python -m mpipar.generate`, `python -m mpipar.evaluate`); it
imports nothing itself.
"""

import os

UNDER_MPIRUN = "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ

if UNDER_MPIRUN:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
