"""workers.events.ThrottledSink: bare step events are thinned, a loop's metric records are thinned apart from
them (a recover unit's CE/BN record is not lost to the step event just before it), stage ends always pass."""

from __future__ import annotations

from workers.events import ListSink, ThrottledSink


def step(done: int, **metrics) -> dict:
    return {"type": "progress", "stage": "recover", "loop": "recover", "fraction": done / 100, "done": done,
            "total": 100, "unit": "it", **metrics}


def test_metric_records_pass_beside_thinned_step_events_and_the_last_always_passes():
    out = ListSink()
    sink = ThrottledSink(out, interval_s=60)
    for done in range(1, 50):
        sink.publish(step(done))
    sink.publish(step(50, ce=2.5, bn=0.7))  # right after a step event: still passes
    sink.publish(step(51, ce=2.4, bn=0.6))  # a second record within the interval: thinned
    sink.publish(step(100))  # fraction 1
    sink.publish({"type": "stage_finished", "stage": "recover", "seconds": 1.0})
    kept = [(e["type"], e.get("done"), e.get("ce")) for e in out.events]
    assert kept == [("progress", 1, None), ("progress", 50, 2.5), ("progress", 100, None), ("stage_finished", None, None)]
    assert [e["seq"] for e in out.events] == [1, 2, 3, 4]
