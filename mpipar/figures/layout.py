"""The rank grid (chapter 3): 8 ranks as dp × tp × pp = 2 × 2 × 2 and the groups they form.

Each rank's coordinates come from `mpipar.grid.rank_coords` (tp varies fastest, then dp,
then pp), and a group is the set of ranks that differ from each other only in its own
coordinate, the rule by which `ProcessGrid.build` splits the world communicator. Three
panels show the same ranks, each coloured by its tp, dp or pp group.
"""

from __future__ import annotations

from mpipar.grid import rank_coords
from mpipar.svg import MUTED, RANK_COLORS, Canvas, text_width

DP, TP, PP = 2, 2, 2
KINDS = ("tp", "dp", "pp")
BOX_W, BOX_H, STEP_X, STEP_Y = 58, 40, 66, 50


def groups(kind: str, dp: int = DP, tp: int = TP, pp: int = PP) -> list[list[int]]:
    """The ``kind`` groups of a dp × tp × pp grid, each a sorted list of global ranks."""
    varying = {"pp": 0, "dp": 1, "tp": 2}[kind]
    by_key: dict[tuple[int, ...], list[int]] = {}
    for rank in range(dp * tp * pp):
        coords = rank_coords(rank, dp, tp, pp)
        key = tuple(v for i, v in enumerate(coords) if i != varying)
        by_key.setdefault(key, []).append(rank)
    return sorted(by_key.values())


def box_position(rank: int, x: float, y: float) -> tuple[float, float]:
    """Top-left corner of a rank's box in a panel at (x, y): stages side by side, a row per
    data-parallel replica, tp ranks next to each other."""
    p, d, t = rank_coords(rank, DP, TP, PP)
    return x + p * (TP * STEP_X + 28) + t * STEP_X, y + d * STEP_Y


def draw_panel(c: Canvas, kind: str, x: float, y: float) -> None:
    title = {"tp": "tensor-parallel groups", "dp": "data-parallel groups",
             "pp": "pipeline (and embedding) groups"}[kind]
    c.text(x, y, title, size=13, bold=True)
    for p in range(PP):
        left = x + p * (TP * STEP_X + 28) - 6
        c.rect(left, y + 12, TP * STEP_X + 4, DP * STEP_Y + 24, "#f6f6f6", MUTED, rx=6)
        c.text(left + 6, y + 26, f"stage {p}", size=10, fill=MUTED)
    top = y + 32
    color_of = {r: RANK_COLORS[i % len(RANK_COLORS)]
                for i, members in enumerate(groups(kind)) for r in members}
    for r, color in sorted(color_of.items()):
        bx, by = box_position(r, x, top)
        c.rect(bx, by, BOX_W, BOX_H, color, "#ffffff", rx=5, stroke_width=2)
        p, d, t = rank_coords(r, DP, TP, PP)
        c.text(bx + BOX_W / 2, by + 17, f"rank {r}", size=12, anchor="middle", fill="#ffffff",
               bold=True)
        c.text(bx + BOX_W / 2, by + 32, f"p{p} d{d} t{t}", size=10, anchor="middle",
               fill="#ffffff")
    left = x
    for i, members in enumerate(groups(kind)):  # the groups as sets, in their colours
        listed = "{" + ", ".join(map(str, members)) + "}"
        c.text(left, top + DP * STEP_Y + 28, listed, size=12, bold=True,
               fill=RANK_COLORS[i % len(RANK_COLORS)])
        left += text_width(listed, 12) + 8


def grid_figure() -> str:
    panel_w = PP * (TP * STEP_X + 28) + 24
    c = Canvas(3 * panel_w + 12, 256, "8 ranks as dp 2 × tp 2 × pp 2 and their groups", "grid")
    c.text(12, 22, f"{DP * TP * PP} ranks as dp {DP} × tp {TP} × pp {PP}: rank r = "
           "(pp · dp_size + dp) · tp_size + tp, each coloured by its group", size=14, bold=True)
    for i, kind in enumerate(KINDS):
        draw_panel(c, kind, 18 + i * panel_w, 54)
    c.text(12, 246, "p, d, t: the rank's pipeline stage, data-parallel replica and "
           "tensor-parallel rank. Tensor-parallel peers are neighbours: they talk the most.",
           size=11, fill=MUTED)
    return c.svg()
