"""Launch helpers shared by the kernels (triton_kernels/_launch.py)."""
import json
from pathlib import Path

import pytest
import torch
import triton


def test_timed_choice_skips_timing_during_graph_capture_and_when_deterministic(monkeypatch):
    """Nothing is timed inside a CUDA-graph capture (first candidate, not cached), and deterministic
    algorithms turn tuning off (the choice can reorder a reduction's partial sums)."""
    from fastvision.triton_kernels import _launch

    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed during capture"))
    assert _launch.timed_choice(("k",), ["first", "second"], lambda c: None, 0) == "first"
    assert _launch._TUNED == {}

    monkeypatch.setenv("FASTVISION_AUTOTUNE", "1")
    assert _launch.tuning_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not _launch.tuning_enabled()
    finally:
        torch.use_deterministic_algorithms(deterministic)


class _FakeProperties:
    name, major, minor = "NVIDIA Test GPU 80GB", 9, 0


@pytest.fixture
def tuning_cache(monkeypatch, tmp_path):
    """timed_choice with a fake timer and GPU, its disk cache in tmp_path; yields the list of timed candidates."""
    from fastvision.triton_kernels import _launch

    timed = []

    def fake_do_bench(fn, **kwargs):
        return fn()

    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _FakeProperties())
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setenv("FASTVISION_TUNING_CACHE", str(tmp_path))
    yield timed


def _choose(candidates, timed, speed):
    from fastvision.triton_kernels import _launch

    def launch(candidate):
        timed.append(candidate)
        return speed[candidate]

    return _launch.timed_choice(("attention_fwd_kernel", 197, torch.bfloat16, 0), candidates, launch, 0)


def test_tuning_cache_gives_a_new_process_the_stored_choice(tuning_cache, tmp_path):
    from fastvision.triton_kernels import _launch

    speed = {"64x64": 2.0, "128x64": 1.0, "64x32": 3.0}
    assert _choose(list(speed), tuning_cache, speed) == "128x64"
    assert sorted(tuning_cache) == sorted(speed)
    (path,) = tmp_path.iterdir()
    assert path == Path(_launch.tuning_cache_file(0))
    assert "NVIDIA_Test_GPU_80GB-sm90" in path.name and f"triton{triton.__version__}" in path.name

    _launch._TUNED.clear()  # a new process: the choice comes from the file, nothing is timed
    tuning_cache.clear()
    assert _choose(list(speed), tuning_cache, speed) == "128x64" and tuning_cache == []

    _launch._TUNED.clear()  # even while a CUDA graph is captured, where nothing can be timed
    with pytest.MonkeyPatch.context() as capture:
        capture.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert _choose(list(speed), tuning_cache, speed) == "128x64" and tuning_cache == []

    _launch._TUNED.clear()  # the stored choice is no longer a candidate: timed again
    assert _choose(["64x64", "64x32"], tuning_cache, speed) == "64x64" and len(tuning_cache) == 2


def test_tuning_cache_ignores_other_kernel_sources_and_broken_files(tuning_cache, tmp_path, monkeypatch):
    from fastvision.triton_kernels import _launch

    speed = {"a": 1.0, "b": 2.0}
    assert _choose(list(speed), tuning_cache, speed) == "a"
    path = Path(_launch.tuning_cache_file(0))
    stored = json.loads(path.read_text())
    other_kernels = {"kernel_sources": "written by other kernels", "choices": {k: "b" for k in stored["choices"]}}
    for content in (json.dumps(other_kernels), "{not json"):
        path.write_text(content)
        _launch._TUNED.clear()
        tuning_cache.clear()
        assert _choose(list(speed), tuning_cache, speed) == "a" and len(tuning_cache) == 2
    assert json.loads(path.read_text())["kernel_sources"] == _launch._kernel_sources_digest()


def test_tuning_cache_off_or_unwritable_keeps_tuning_in_memory(tuning_cache, tmp_path, monkeypatch):
    from fastvision.triton_kernels import _launch

    speed = {"a": 1.0, "b": 2.0}
    monkeypatch.setenv("FASTVISION_TUNING_CACHE", "0")
    assert _launch.tuning_cache_file(0) is None
    assert _choose(list(speed), tuning_cache, speed) == "a"
    assert list(tmp_path.iterdir()) == []

    blocker = tmp_path / "a file, not a directory"
    blocker.write_text("")
    monkeypatch.setenv("FASTVISION_TUNING_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(_launch, "_STORE_WARNED", False)
    _launch._TUNED.clear()
    with pytest.warns(UserWarning, match="cannot write the tuning cache"):
        assert _choose(list(speed), tuning_cache, speed) == "a"
    assert _launch._TUNED and sorted(p.name for p in tmp_path.iterdir()) == ["a file, not a directory"]
