"""Tracer, summary table, Chrome export and JSON-lines round trip (no MPI needed)."""

from __future__ import annotations

import json

import pytest

from mpipar.trace import (
    Tracer,
    TraceRecord,
    comm_totals,
    format_summary_table,
    human_bytes,
    load_jsonl,
    to_chrome_trace,
    write_jsonl,
)


def rec(tracer: Tracer, op: str, group: str, nbytes: int, start: float, end: float,
        peer: int | None = None) -> None:
    tracer.record(op, group, peer, nbytes, "float32", (nbytes // 4,), start, end)


def test_disabled_tracer_records_nothing():
    tracer = Tracer(rank=3)
    assert tracer.enabled is False
    rec(tracer, "allreduce", "dp", 64, 0.0, 1.0)
    with tracer.span("forward", phase="forward", microbatch=0):
        rec(tracer, "send", "pp", 8, 0.0, 1.0, peer=4)
    assert tracer.records == []
    assert tracer.totals() == {}


def test_record_is_stamped_with_the_current_context():
    tracer = Tracer(rank=2, enabled=True)
    rec(tracer, "allreduce", "tp", 16, 1.0, 1.5)
    with tracer.context(phase="backward", microbatch=3, step=7):
        rec(tracer, "send", "pp", 32, 2.0, 2.25, peer=6)
        with tracer.context(phase="optimizer"):
            rec(tracer, "reduce_scatter", "dp", 64, 3.0, 3.5)
        tracer.record("isend", "pp", 6, 8, "float64", (1,), 4.0, 4.5, phase="forward",
                      step=6, microbatch=1)
    first, second, third, fourth = tracer.records
    assert first == TraceRecord(2, "allreduce", "tp", None, 16, "float32", (4,), "other", 0,
                                None, 1.0, 1.5)
    assert (second.phase, second.step, second.microbatch, second.peer) == ("backward", 7, 3, 6)
    assert (third.phase, third.step, third.microbatch) == ("optimizer", 7, 3)
    assert (fourth.phase, fourth.step, fourth.microbatch) == ("forward", 6, 1)
    assert second.duration == pytest.approx(0.25)
    assert (tracer.phase, tracer.step, tracer.microbatch) == ("other", 0, None)


def test_context_restores_after_an_exception_and_rejects_unknown_phases():
    tracer = Tracer(rank=0, enabled=True)
    with pytest.raises(KeyError), tracer.context(phase="forward", microbatch=2, step=1):
        raise KeyError("x")
    assert (tracer.phase, tracer.step, tracer.microbatch) == ("other", 0, None)
    with pytest.raises(ValueError, match="'fwd'"), tracer.context(phase="fwd"):
        pass


def test_span_records_compute_around_its_body():
    tracer = Tracer(rank=1, enabled=True)
    with tracer.span("block 0", phase="forward", microbatch=4):
        assert (tracer.phase, tracer.microbatch) == ("forward", 4)
        rec(tracer, "allreduce", "tp", 16, 0.0, 0.0)
    inner, span = tracer.records
    assert (span.op, span.name, span.phase, span.microbatch) == ("compute", "block 0", "forward", 4)
    assert (inner.phase, inner.microbatch) == ("forward", 4)
    assert span.start <= span.end
    assert tracer.phase == "other" and tracer.microbatch is None


def test_totals_sum_communication_per_op_and_group_and_skip_compute():
    tracer = Tracer(rank=0, enabled=True)
    rec(tracer, "allreduce", "dp", 100, 0.0, 0.5)
    rec(tracer, "allreduce", "dp", 300, 1.0, 1.25)
    rec(tracer, "allreduce", "tp", 8, 2.0, 2.5)
    rec(tracer, "send", "pp", 40, 3.0, 3.5, peer=2)
    with tracer.span("fwd"):
        pass
    totals = tracer.totals()
    assert list(totals) == [("allreduce", "dp"), ("allreduce", "tp"), ("send", "pp")]
    assert totals[("allreduce", "dp")] == {"calls": 2, "bytes": 400, "time": 0.75,
                                           "exposed": 0.75}
    assert totals[("send", "pp")] == {"calls": 1, "bytes": 40, "time": 0.5, "exposed": 0.5}
    assert comm_totals(tracer.records) == totals
    tracer.clear()
    assert tracer.records == [] and tracer.totals() == {}


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(16 * 2**20) == "16.00 MiB"
    assert human_bytes(3 * 2**40) == "3072.00 GiB"


def test_exposed_time_of_blocking_and_non_blocking_calls():
    """A blocking call holds the rank up for all of its span; a request only while waited."""
    tracer = Tracer(rank=0, enabled=True)
    rec(tracer, "allreduce", "dp", 8, 0.0, 0.5)
    tracer.record("iallreduce", "dp", None, 64, "float32", (16,), 1.0, 4.0, waited=0.25)
    blocking, request = tracer.records
    assert (blocking.waited, blocking.exposed) == (None, 0.5)
    assert (request.duration, request.exposed) == (3.0, 0.25)
    totals = tracer.totals()
    assert totals[("iallreduce", "dp")] == {"calls": 1, "bytes": 64, "time": 3.0,
                                            "exposed": 0.25}


def test_summary_table_rows_and_shares():
    """Four overlapped all-reduces spanning 30 s in a 10 s run, 1 s of it waited: the share
    counts the waited second (10%), not the 300% that launch-to-completion time would give."""
    totals = {
        ("iallreduce", "dp"): {"calls": 4, "bytes": 4 * 2**20, "time": 30.0, "exposed": 1.0},
        ("send", "pp"): {"calls": 10, "bytes": 2048, "time": 0.5, "exposed": 0.5},
    }
    table = format_summary_table(totals, total_time_s=10.0)
    lines = table.splitlines()
    assert lines[0].split() == ["op", "group", "calls", "bytes", "exposed", "s", "overlapped",
                                "s", "share"]
    row = lines[2].split()
    assert row == ["iallreduce", "dp", "4", "4.00", "MiB", "1.0000", "29.0000", "10.0%"], row
    assert lines[3].split() == ["send", "pp", "10", "2.00", "KiB", "0.5000", "0.0000", "5.0%"]
    assert lines[-1].split() == ["total", "14", "4.00", "MiB", "1.5000", "29.0000", "15.0%"]
    assert all(len(line) <= 100 for line in lines)
    assert "0.0%" in format_summary_table(totals, total_time_s=0.0)  # no division by zero


def test_chrome_trace_events():
    a, b = Tracer(rank=0, enabled=True), Tracer(rank=1, enabled=True)
    with a.context(phase="forward", microbatch=0):
        a.record("send", "pp", 1, 64, "float32", (4, 4), 10.0, 10.002)
    with b.span("fwd"):
        pass
    b.record("allreduce", "dp", None, 8, "float64", (1,), 10.5, 10.75)
    trace = to_chrome_trace(a.records + b.records)
    json.dumps(trace)  # must be serialisable as is
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert {(e["pid"], e["args"]["name"]) for e in meta if e["name"] == "process_name"} == {
        (0, "rank 0"), (1, "rank 1")}
    send, fwd, allreduce = complete
    assert (send["pid"], send["tid"], send["cat"]) == (0, 1, "forward")
    assert send["name"] == "send [pp] mb0"
    assert send["ts"] == 0.0 and send["dur"] == pytest.approx(2000.0)
    assert send["args"]["peer"] == 1 and send["args"]["shape"] == [4, 4]
    assert (fwd["pid"], fwd["tid"], fwd["name"]) == (1, 0, "fwd")
    assert (allreduce["tid"], allreduce["name"]) == (2, "allreduce [dp]")
    assert allreduce["ts"] == pytest.approx(500_000.0) and allreduce["dur"] == pytest.approx(
        250_000.0)
    assert to_chrome_trace([])["traceEvents"] == []


def test_jsonl_round_trip(tmp_path):
    tracer = Tracer(rank=5, enabled=True)
    with tracer.context(phase="backward", microbatch=1, step=2):
        tracer.record("recv", "pp", 4, 48, "float32", (3, 4), 1.0, 2.0)
        with tracer.span("bwd"):
            pass
    path = tmp_path / "trace.jsonl"
    tracer.write_jsonl(str(path))
    loaded = load_jsonl(str(path))
    assert loaded == tracer.records
    assert isinstance(loaded[0].shape, tuple)
    other = tmp_path / "first.jsonl"
    write_jsonl(str(other), tracer.records[:1])
    assert [json.loads(line)["op"] for line in other.read_text().splitlines()] == ["recv"]
