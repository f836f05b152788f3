"""Pipeline parallelism with schedules as data.

`schedules` builds, for every pipeline rank, the list of instructions (`instructions`) that
rank runs in one training step; `checker` proves a schedule completes under blocking MPI
semantics and simulates its timing; `timeline` draws simulated or measured timelines as text.
`zero_bubble` holds the ZB-H1 schedule, whose backward is split in two. `stages` cuts the
model into chunks, and the MPI `executor` runs the same lists on them with one handler per
instruction class, its buffers and activation stash in `memory`. `measure`
reads timelines, bubbles and the run report back from a trace; `pictures` holds the
``python -m mpipar.viz schedule`` and ``timeline`` commands and the PNG drawing.
"""

from .checker import (
    ScheduleError,
    ScheduleReport,
    check_schedule,
    simulate,
    theoretical_bubble,
    zero_bubble_h1_bubble,
)
from .instructions import (
    TAG_ACTIVATION,
    TAG_GRAD,
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    Instruction,
    OptimizerStep,
    PointToPoint,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    Schedule,
    SendActivation,
    SendGrad,
    SendRecv,
    is_first_stage,
    is_last_stage,
    message_parts,
    stage_location,
    virtual_stage,
)
from .schedules import (
    SCHEDULE_NAMES,
    build_schedule,
    format_schedule,
    gpipe,
    interleaved_one_f_one_b,
    interleaved_order,
    naive,
    one_f_one_b,
)
from .timeline import Interval, Timeline, as_timeline, render_text
from .zero_bubble import zero_bubble_h1, zero_bubble_h1_order

__all__ = [
    "SCHEDULE_NAMES",
    "TAG_ACTIVATION",
    "TAG_GRAD",
    "Backward",
    "BackwardInput",
    "BackwardWeight",
    "Forward",
    "Instruction",
    "Interval",
    "OptimizerStep",
    "PointToPoint",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "Schedule",
    "ScheduleError",
    "ScheduleReport",
    "SendActivation",
    "SendGrad",
    "SendRecv",
    "Timeline",
    "as_timeline",
    "build_schedule",
    "check_schedule",
    "format_schedule",
    "gpipe",
    "interleaved_one_f_one_b",
    "interleaved_order",
    "is_first_stage",
    "is_last_stage",
    "message_parts",
    "naive",
    "one_f_one_b",
    "render_text",
    "simulate",
    "stage_location",
    "theoretical_bubble",
    "virtual_stage",
    "zero_bubble_h1",
    "zero_bubble_h1_bubble",
    "zero_bubble_h1_order",
]
