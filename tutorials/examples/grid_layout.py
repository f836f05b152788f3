"""Where each rank of a dp × tp × pp job sits, and the groups ``Comm.Split`` makes of them.

    python tutorials/examples/grid_layout.py [--dp 2] [--tp 2] [--pp 2] [--split]

No MPI needed: the coordinates come from ``mpipar.grid.rank_coords`` and each rank's
``(color, key)`` from ``mpipar.grid.split_colors``, exactly what ``ProcessGrid.build`` hands
to ``Comm.split``; :func:`simulate_split` then does what ``MPI_Comm_split`` does with them
(ranks of one color form a group, ordered by key, then by rank). Prints one row per rank
with its coordinates and the members of its four groups, then each pipeline stage's
data-parallel replicas; ``--split`` adds the colors and keys, and the groups by color.
"""

from __future__ import annotations

import argparse

from mpipar.grid import rank_coords, split_colors

KINDS = ("tp", "dp", "pp", "embed")


def simulate_split(entries: list[tuple[int | None, int]]) -> dict[int, list[int]]:
    """``MPI_Comm_split`` on paper: ``entries[r]`` is rank r's ``(color, key)``.

    Returns color → the ranks of that color ordered by (key, rank); a rank whose color is
    ``None`` (``MPI_UNDEFINED``) joins no group.
    """
    groups: dict[int, list[tuple[int, int]]] = {}
    for rank, (color, key) in enumerate(entries):
        if color is not None:
            groups.setdefault(color, []).append((key, rank))
    return {color: [rank for _, rank in sorted(members)]
            for color, members in sorted(groups.items())}


def grid_groups(dp: int, tp: int, pp: int) -> dict[str, dict[int, list[int]]]:
    """For each kind, color → members, as the world's split would make them.

    The embedding group exists only with pp > 1 (with one stage the embedding is one copy).
    """
    world = dp * tp * pp
    colors = [split_colors(r, dp, tp, pp) for r in range(world)]
    kinds = KINDS if pp > 1 else KINDS[:3]
    return {kind: simulate_split([c[kind] for c in colors]) for kind in kinds}


def _members(group: list[int] | None) -> str:
    return "-" if group is None else "{" + ", ".join(map(str, group)) + "}"


def layout_table(dp: int, tp: int, pp: int) -> list[str]:
    """One line per rank: its (pp, dp, tp) and the members of each of its groups."""
    groups = grid_groups(dp, tp, pp)
    world = dp * tp * pp
    width = max(len(_members(g)) for by_color in groups.values() for g in by_color.values())
    width = max(width, len("embed group"))
    lines = [f"dp {dp} × tp {tp} × pp {pp} = {world} ranks; rank r sits at (pp, dp, tp) = "
             f"(r // {tp * dp}, r // {tp} % {dp}, r % {tp})", "",
             ("rank  pp  dp  tp  " + "  ".join(f"{k + ' group':<{width}}" for k in KINDS)).rstrip()]
    for r in range(world):
        p, d, t = rank_coords(r, dp, tp, pp)
        colors = split_colors(r, dp, tp, pp)
        cells = [_members(groups[k].get(colors[k][0])) if k in groups else "-" for k in KINDS]
        lines.append(f"{r:>4}  {p:>2}  {d:>2}  {t:>2}  "
                     + "  ".join(f"{c:<{width}}" for c in cells).rstrip())
    return lines


def stage_lines(dp: int, tp: int, pp: int) -> list[str]:
    """Each pipeline stage as its data-parallel replicas, each a tensor-parallel group."""
    lines = []
    for p in range(pp):
        replicas = []
        for d in range(dp):
            first = (p * dp + d) * tp
            ranks = " ".join(str(first + t) for t in range(tp))
            replicas.append(f"replica dp {d}: ranks {ranks}")
        lines.append(f"stage {p} | " + " | ".join(replicas))
    return lines


def split_lines(dp: int, tp: int, pp: int) -> list[str]:
    """Every rank's (color, key) per kind, then the groups of each color."""
    groups = grid_groups(dp, tp, pp)
    lines = ["what each rank hands to Comm.split, (color, key):",
             "rank  " + "  ".join(f"{k:<9}" for k in groups).rstrip()]
    for r in range(dp * tp * pp):
        colors = split_colors(r, dp, tp, pp)
        cells = [f"({'-' if colors[k][0] is None else colors[k][0]}, {colors[k][1]})"
                 for k in groups]
        lines.append(f"{r:>4}  " + "  ".join(f"{c:<9}" for c in cells).rstrip())
    lines += ["", "the groups Split makes (one per color, ranks in key order):"]
    for kind, by_color in groups.items():
        lines.append(f"{kind + ':':<7}" + "  ".join(
            f"color {color}: {_members(members)}" for color, members in by_color.items()))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--dp", "--tp", "--pp"):
        ap.add_argument(flag, type=int, default=2)
    ap.add_argument("--split", action="store_true", help="also print colors, keys and groups")
    args = ap.parse_args()
    if min(args.dp, args.tp, args.pp) < 1:
        ap.error("--dp, --tp and --pp must be at least 1")
    lines = layout_table(args.dp, args.tp, args.pp) + [""] + stage_lines(args.dp, args.tp,
                                                                         args.pp)
    if args.split:
        lines += [""] + split_lines(args.dp, args.tp, args.pp)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
