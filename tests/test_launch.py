"""Launch helpers shared by the kernels (triton_kernels/_launch.py)."""
import pytest
import torch


def test_timed_choice_skips_timing_during_graph_capture_and_when_deterministic(monkeypatch):
    """Nothing is timed inside a CUDA-graph capture (first candidate, not cached), and deterministic
    algorithms turn tuning off (the choice can reorder a reduction's partial sums)."""
    import triton

    from fastvision.triton_kernels import _launch

    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed during capture"))
    assert _launch.timed_choice(("k",), ["first", "second"], lambda c: None) == "first"
    assert _launch._TUNED == {}

    monkeypatch.setenv("FASTVISION_AUTOTUNE", "1")
    assert _launch.tuning_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not _launch.tuning_enabled()
    finally:
        torch.use_deterministic_algorithms(deterministic)
