"""Figures drawn from mpipar's own code and data, as SVG (`mpipar.svg`).

``python -m mpipar.figures`` (``make figures``) writes every figure of the tutorials into
``tutorials/figures/``; `catalog` lists them, with the chapter each belongs to. One module per
subject draws them:

* `collectives`: what all-reduce, reduce-scatter, all-gather and broadcast leave on each rank
  (chapter 0), and the ring all-reduce as mpipar's own `ring_reduce_scatter` and
  `ring_allgather` run it (chapter 2);
* `zero`: which slices of parameters, gradients and optimizer state a rank keeps under
  ZeRO-1, 2 and 3 (chapter 2);
* `tensor`: a weight split by columns and by rows, and where f and g sit in a block
  (chapter 3);
* `layout`: the ranks of a dp × tp × pp grid and their groups (chapter 3);
* `timelines`: GPipe, 1F1B and interleaved steps measured in real runs, from the traces kept
  in ``tutorials/figures/data/`` (chapter 4).

`charts` holds the plots the run report shares with them (line charts, timelines, bars).
This package imports nothing from it at import time, so ``mpipar.figures.charts`` is cheap.
"""
