"""``ProcessGrid`` groups checked on a real job: ``mpirun -n 8 python grid_checks.py``.

Builds every layout of 8 ranks named in ``LAYOUTS`` and checks, on every rank, that each
group holds exactly the ranks the docs/design.md §4 formula says (computed here
independently by brute force over all ranks), that the groups really communicate among those
ranks, and the embedding group and pipeline neighbours. Prints a VERDICT.
"""

from __future__ import annotations

import numpy as np
from verdict import Checks

from mpipar.comm import Comm, install_excepthook
from mpipar.grid import ConfigError, ProcessGrid, check_same_config

# (dp, tp, pp): the full 3-D grid, each axis alone, and a 4-stage pipeline with middle stages.
LAYOUTS = [(2, 2, 2), (8, 1, 1), (1, 8, 1), (1, 1, 8), (1, 2, 4), (2, 1, 4), (4, 2, 1)]


def coords(rank: int, dp: int, tp: int) -> tuple[int, int, int]:
    """(pp, dp, tp) of a rank, written out independently of mpipar.grid."""
    return rank // (dp * tp), rank // tp % dp, rank % tp


def main() -> None:
    world = Comm.world()
    install_excepthook(world)
    checks = Checks(world)
    r = world.rank

    for dp, tp, pp in LAYOUTS:
        with checks.check(f"groups_dp{dp}_tp{tp}_pp{pp}"):
            check_groups(world, dp, tp, pp)

    with checks.check("check_same_config_equal"):
        check_same_config(world, {"lr": 0.1, "layout": [2, 2, 2], "name": "tiny"})

    with checks.check("check_same_config_differs"):
        try:
            check_same_config(world, {"lr": 0.1 if r != 3 else 0.2, "seed": 1})
        except ConfigError as e:
            msg = str(e)
        else:
            raise AssertionError("no ConfigError although rank 3 has another lr")
        assert "ranks [0, 1, 2, 4, 5, 6, 7]: lr=0.1" in msg, msg
        assert "ranks [3]: lr=0.2" in msg and "seed" not in msg, msg

    with checks.check("size_mismatch"):
        try:
            ProcessGrid.build(world, 2, 2, 1)
        except ConfigError as e:
            assert "world size 8 != --dp 2 × --tp 2 × --pp 1 = 4" in str(e), e
        else:
            raise AssertionError("ProcessGrid.build accepted 2 × 2 × 1 ranks for 8")

    with checks.check("single"):
        single = ProcessGrid.single()
        x = single.dp_comm.allreduce(np.array([float(r)]))
        assert x[0] == r and single.world.size == 1 and single.embed_comm is None
        assert single.is_first_stage and single.is_last_stage and single.next_rank is None

    checks.report()


def check_groups(world: Comm, dp: int, tp: int, pp: int) -> None:
    """Every group of a dp × tp × pp grid holds exactly the formula's ranks and talks to them;
    then the pipeline neighbours and the embedding group."""
    n, r = world.size, world.rank
    grid = ProcessGrid.build(world, dp, tp, pp)
    # Each group sums its members' global ranks: proves the group talks to them.
    sums = {
        name: comm.allreduce(np.array([float(r)]))[0]
        for name, comm in (("dp", grid.dp_comm), ("tp", grid.tp_comm),
                           ("pp", grid.pp_comm), ("embed", grid.embed_comm))
        if comm is not None
    }
    me = coords(r, dp, tp)
    assert (grid.pp_rank, grid.dp_rank, grid.tp_rank) == me, grid.describe()
    assert (grid.dp, grid.tp, grid.pp) == (dp, tp, pp)
    # The members of a group: all ranks that differ from me only in its coordinate,
    # ordered by that coordinate.
    same = {
        "tp": [q for q in range(n) if coords(q, dp, tp)[:2] == me[:2]],
        "dp": [q for q in range(n) if coords(q, dp, tp)[::2] == me[::2]],
        "pp": [q for q in range(n) if coords(q, dp, tp)[1:] == me[1:]],
    }
    for name, comm in (("dp", grid.dp_comm), ("tp", grid.tp_comm), ("pp", grid.pp_comm)):
        assert comm.group == name, comm
        assert list(comm.members) == same[name], f"{name}: {comm} != {same[name]}"
        assert sums[name] == sum(same[name]), (name, sums[name])
    assert grid.pp_comm.rank == grid.pp_rank, "pp_comm rank must be the stage"
    assert grid.dp_comm.rank == grid.dp_rank and grid.tp_comm.rank == grid.tp_rank
    check_pipeline_ends(grid, same["pp"], sums, r, pp)


def check_pipeline_ends(grid: ProcessGrid, stages: list[int], sums: dict[str, float], r: int,
                        pp: int) -> None:
    """First/last stage, the neighbours' global ranks, and the embedding group of the ends."""
    first, last = stages[0], stages[-1]
    assert grid.is_first_stage == (r == first)
    assert grid.is_last_stage == (r == last)
    idx = stages.index(r)
    assert grid.prev_rank == (stages[idx - 1] if idx > 0 else None), grid.prev_rank
    assert grid.next_rank == (stages[idx + 1] if idx < pp - 1 else None)
    if pp == 1 or r not in (first, last):
        assert grid.embed_comm is None, grid.embed_comm
    else:
        assert grid.embed_comm.group == "embed"
        assert grid.embed_comm.members == (first, last), grid.embed_comm
        assert sums["embed"] == first + last


if __name__ == "__main__":
    main()
