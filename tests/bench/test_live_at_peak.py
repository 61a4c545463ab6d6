"""memlab.bench.measure.live_at_peak: the blocks live at the peak of a CUDA allocator history."""

from __future__ import annotations

from memlab.bench.measure import live_at_peak


def frame(name: str, line: int) -> dict:
    return {"filename": f"/x/memlab/kvcache/{name}.py", "line": line, "name": name}


def test_replays_allocs_and_frees_and_keeps_the_peak_moment() -> None:
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": [frame("a", 1), {"filename": "/usr/lib/x.py",
                                                                               "line": 3, "name": "x"}]},
        {"action": "alloc", "addr": 2, "size": 500, "frames": [frame("b", 2)]},
        {"action": "free_requested", "addr": 2, "size": 500},
        {"action": "free_completed", "addr": 2, "size": 500},
        {"action": "alloc", "addr": 3, "size": 300, "frames": [frame("c", 3)]},  # total 400 < 600
        {"action": "alloc", "addr": 4, "size": 50, "frames": []},
    ]
    blocks = live_at_peak({"device_traces": [events]})
    # The peak (600 bytes) was blocks 1 and 2 together; block 3 came after block 2 was freed.
    assert [b["bytes"] for b in blocks] == [500, 100]
    assert blocks[0]["frames"] == ["kvcache/b.py:2 b"]
    assert blocks[1]["frames"] == ["kvcache/a.py:1 a"]  # frames outside `keep` dropped


def test_empty_history() -> None:
    assert live_at_peak({"device_traces": []}) == []
    assert live_at_peak({}) == []
