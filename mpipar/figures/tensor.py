"""Tensor parallelism (chapter 3): a weight split by columns and by rows, and where the
operators f and g sit in a transformer block.

The shapes are the ``tiny`` preset's MLP (d_model 64, hidden 256) on tp = 2, and which rows
and columns each rank keeps come from the layers' own rule, `column_shard_rows` (a
row-parallel layer cuts its input features into the same even blocks); the heads each rank
computes in attention follow from n_head / tp.
"""

from __future__ import annotations

from mpipar.model import PRESETS
from mpipar.parallel.tensor_parallel.layers import column_shard_rows
from mpipar.svg import INK, MUTED, RANK_COLORS, Canvas

TP = 2
TINY = PRESETS["tiny"]
PX = 0.55  # pixels per feature in the matrix drawings


def rows_of(d: int, rank: int) -> str:
    """``'0–127'``: the features rank ``rank`` of ``TP`` keeps out of ``d``."""
    block = column_shard_rows(d, TP, rank)
    return f"{block.start}–{block.stop - 1}"


def split_bar(c: Canvas, x: float, y: float, length: float, thick: float, *,
              vertical: bool) -> None:
    """A bar cut into TP equal blocks, one colour per rank (along x, or along y)."""
    for r in range(TP):
        step = length / TP
        if vertical:
            c.rect(x, y + r * step, thick, step, RANK_COLORS[r], "#ffffff")
        else:
            c.rect(x + r * step, y, step, thick, RANK_COLORS[r], "#ffffff")


def column_panel(c: Canvas, x: float, y: float, d_in: int, d_out: int) -> None:
    """x whole → W cut into row blocks → y cut into the same blocks, one per rank."""
    c.text(x, y, "Column-parallel: split W by output features (rows of W)", size=13, bold=True)
    c.text(x, y + 18, f"y = x Wᵀ with W ({d_out} × {d_in}): rank r computes its block of y, "
           "no communication in forward", size=11, fill=MUTED)
    top, mid = y + 34, y + 34 + d_out * PX / 2
    c.rect(x, mid - 11, d_in * PX, 22, "#999999")
    c.text(x, mid + 26, f"x (B, T, {d_in})", size=11)
    c.text(x, mid + 40, "whole, on every rank", size=11, fill=MUTED)
    mx = x + 170
    c.line(x + d_in * PX + 8, mid, mx - 8, mid, MUTED, arrow=True)
    split_bar(c, mx, top, d_out * PX, d_in * PX, vertical=True)
    for r in range(TP):
        c.text(mx + d_in * PX + 8, top + (r + 0.5) * d_out * PX / TP + 4,
               f"rank {r}: rows {rows_of(d_out, r)}", size=11, fill=RANK_COLORS[r])
    c.text(mx, top + d_out * PX + 16, f"W ({d_out} × {d_in})", size=11)
    yx = mx + 300
    c.line(mx + d_in * PX + 140, mid, yx - 8, mid, MUTED, arrow=True)
    split_bar(c, yx, mid - 11, d_out * PX, 22, vertical=False)
    c.text(yx, mid + 26, f"y = [y₀ | y₁]  (B, T, {d_out})", size=11)
    c.text(yx, mid + 40, f"rank r holds y_r = x W_rᵀ  (B, T, {d_out // TP})", size=11,
           fill=MUTED)


def row_panel(c: Canvas, x: float, y: float, d_in: int, d_out: int) -> None:
    """x cut into column blocks → W cut the same way → partial sums → all-reduce → y."""
    c.text(x, y, "Row-parallel: split W by input features (columns of W)", size=13, bold=True)
    c.text(x, y + 18, f"y = Σ_r x_r W_rᵀ with W ({d_out} × {d_in}): each rank adds a partial "
           "sum, one all-reduce in forward", size=11, fill=MUTED)
    mid = y + 64
    split_bar(c, x, mid - 11, d_in * PX, 22, vertical=False)
    c.text(x, mid + 26, f"x = [x₀ | x₁]  (B, T, {d_in})", size=11)
    c.text(x, mid + 40, "split, as column-parallel left it", size=11, fill=MUTED)
    mx = x + 200
    c.line(x + d_in * PX + 8, mid, mx - 8, mid, MUTED, arrow=True)
    split_bar(c, mx, mid - d_out * PX / 2, d_in * PX, d_out * PX, vertical=False)
    for r in range(TP):
        c.text(mx + (r + 0.5) * d_in * PX / TP, mid + d_out * PX / 2 + 14,
               f"cols {rows_of(d_in, r)}", size=11, anchor="middle", fill=RANK_COLORS[r])
    c.text(mx, mid + d_out * PX / 2 + 30, f"W ({d_out} × {d_in})", size=11)
    px = mx + d_in * PX + 40
    c.line(mx + d_in * PX + 8, mid, px - 8, mid, MUTED, arrow=True)
    for r in range(TP):
        c.rect(px, mid - 26 + r * 30, d_out * PX, 22, RANK_COLORS[r], opacity=0.6)
        c.text(px + d_out * PX + 6, mid - 11 + r * 30, f"x{'₀₁'[r]}W{'₀₁'[r]}ᵀ on rank {r}",
               size=11)
    gx = px + d_out * PX + 130
    c.line(gx - 10, mid, gx + 70, mid, MUTED, arrow=True)
    c.text(gx + 30, mid - 8, "all-reduce", size=11, anchor="middle", fill=INK)
    c.rect(gx + 78, mid - 11, d_out * PX, 22, "#444444")
    c.text(gx + 78, mid + 26, f"y (B, T, {d_out})", size=11)
    c.text(gx + 78, mid + 40, "whole, on every rank", size=11, fill=MUTED)


def tp_linear_figure() -> str:
    d, hidden = TINY["d_model"], 4 * TINY["d_model"]
    c = Canvas(860, 420, "Column- and row-parallel linear layers on 2 ranks", "tplinear")
    column_panel(c, 12, 20, d, hidden)
    row_panel(c, 12, 270, hidden, d)
    c.text(12, 410, f"The tiny preset's MLP on tp = {TP}: fc ({hidden} × {d}) column-parallel, "
           f"then proj ({d} × {hidden}) row-parallel. Rank 0 blue, rank 1 orange.", size=11,
           fill=MUTED)
    return c.svg()


# ---- f and g in a block --------------------------------------------------------------------

LANES = (70.0, 120.0)  # top of each rank's lane; lane boxes are 22 high
WIDTHS = {"both": 40, "f": 30, "g": 30, "lanes": 96}
GAP = 16


def block_steps() -> list[tuple[str, str]]:
    """The block from left to right as (label, kind): "both" spans the two rank lanes (the
    same on every rank), "lanes" is split per rank, "f" and "g" are the operators."""
    return [
        ("LN₁", "both"), ("f", "f"), ("qkv, heads {h}", "lanes"), ("attention", "lanes"),
        ("proj", "lanes"), ("g", "g"), ("+", "both"), ("LN₂", "both"), ("f", "f"),
        ("fc, rows {fc}", "lanes"), ("GELU", "lanes"), ("proj", "lanes"), ("g", "g"),
        ("+", "both"),
    ]


def step_label(text: str, rank: int) -> str:
    heads = TINY["n_head"] // TP
    return text.format(h=f"{rank * heads}–{(rank + 1) * heads - 1}",
                       fc=rows_of(4 * TINY["d_model"], rank))


def ports(kind: str) -> list[float]:
    """The heights where arrows enter and leave a step: each lane's middle, or the middle."""
    if kind == "lanes":
        return [top + 11 for top in LANES]
    return [(LANES[0] + LANES[-1]) / 2 + 11]


def draw_step(c: Canvas, text: str, kind: str, x: float) -> None:
    w, mid = WIDTHS[kind], ports("f")[0]
    if kind in ("f", "g"):
        c.circle(x + w / 2, mid, 13, "#222222")
        c.text(x + w / 2, mid + 5, kind, size=14, anchor="middle", fill="#ffffff", bold=True)
    elif kind == "both":
        c.rect(x, LANES[0], w, LANES[-1] - LANES[0] + 22, "#dddddd", rx=4)
        c.text(x + w / 2, mid + 4, text, size=12, anchor="middle")
    else:
        for r, top in enumerate(LANES):
            c.rect(x, top, w, 22, RANK_COLORS[r], rx=4)
            c.text(x + w / 2, top + 15, step_label(text, r), size=10, anchor="middle",
                   fill="#ffffff")


def connect(c: Canvas, x_out: float, kind_out: str, x_in: float, kind_in: str) -> None:
    """Arrows from one step to the next: lane to lane, or forking and joining at f and g."""
    outs, ins = ports(kind_out), ports(kind_in)
    if len(outs) == len(ins):
        for a, b in zip(outs, ins, strict=True):
            c.line(x_out, a, x_in, b, MUTED, arrow=True)
        return
    for a in outs:
        for b in ins:
            c.line(x_out, a, x_in, b, MUTED, arrow=True)


def tp_block_figure() -> str:
    steps = block_steps()
    xs = [64.0]
    for _, kind in steps:
        xs.append(xs[-1] + WIDTHS[kind] + GAP)
    c = Canvas(xs[-1] + 10, 210, "f and g in a transformer block on 2 ranks", "tpblock")
    c.text(12, 22, f"One block on tp = {TP}: the only communication is f before each split "
           "half and g after it", size=14, bold=True)
    for r, top in enumerate(LANES):
        c.text(12, top + 15, f"rank {r}", size=11, fill=RANK_COLORS[r])
    c.text(xs[0] - 10, ports("f")[0] + 5, "x", size=13, anchor="end", bold=True)
    residual_from = xs[0] - 6
    for i, (text, kind) in enumerate(steps):
        draw_step(c, text, kind, xs[i])
        if i + 1 < len(steps):
            connect(c, xs[i] + WIDTHS[kind], kind, xs[i + 1], steps[i + 1][1])
        if text == "+":  # the residual stream skips the half-block this add closes
            middle = xs[i] + WIDTHS[kind] / 2
            c.polyline([(residual_from, 56), (middle, 56)], MUTED, 1.2, dash=True)
            c.line(middle, 56, middle, LANES[0] - 2, MUTED, arrow=True)
            residual_from = xs[i] + WIDTHS[kind] + GAP / 2
    c.text(12, 172, "f: forward identity (every rank needs the whole input), backward "
           "all-reduce (each rank holds a part of dL/dx)", size=11)
    c.text(12, 190, "g: forward all-reduce (sum the ranks' partial outputs), backward "
           "identity. Grey: the same on every rank; dashed: the residual stream.", size=11)
    return c.svg()
