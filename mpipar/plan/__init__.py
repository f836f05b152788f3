"""The planner, `python -m mpipar.plan`: memory, communication and time of a layout before it
runs, every feasible layout of a model on a cluster, ranked.

`model_shape` (what is trained), `layout` (how), `memory`, `comm` and `compute` (the
estimates), `cluster` (the machines, and calibrating this one), `search` (the ranking).
"""
