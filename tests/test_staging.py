"""The staging pipeline (executors/staging.py), on the CPU: the same ring that serves accelerators,
run for non-contiguous CPU views and, with GEMMA_STREAM_FORCE_STAGING=1, for contiguous ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gemma_stream as gs
from gemma_stream.executors import slots, staging
from gemma_stream.formats import open_checkpoint
from gemma_stream.plan import make_plan
from gemma_stream.quant import quantize_int4, quantize_int8

MiB = 1 << 20


@pytest.fixture
def forced(monkeypatch):
    """Stage every destination through a 1 MiB ring (4 slots of 256 KiB)."""
    monkeypatch.setenv("GEMMA_STREAM_FORCE_STAGING", "1")
    monkeypatch.setenv("GEMMA_STREAM_STAGING_MB", "1")
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")


def _upload_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gemma_stream_upload")]


def _buffers(sd: dict[str, torch.Tensor], dtype=None) -> nn.Module:
    model = nn.Module()
    for name, t in sd.items():
        wanted = dtype if dtype is not None and t.is_floating_point() else t.dtype
        model.register_buffer(name, torch.full(t.shape, 7, dtype=wanted))
    return model


def _mixed(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = {"big": torch.randn(1100, 300), "wide_rows": torch.randn(3, 70000), "vec": torch.randn(90001),
          "f16": torch.randn(257, 129).half(), "brain": torch.randn(400, 333).bfloat16(),
          "scalar": torch.tensor(2.5), "ids": torch.arange(1000, dtype=torch.int64), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "mixed.safetensors")
    save_file(sd, path)
    return path, sd


# ---------------------------------------------------------------- bit-exact results

@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_forced_staging_is_bit_exact(tmp_path, backend, forced, dtype):
    path, sd = _mixed(tmp_path)
    model = _buffers(sd, dtype)
    report = gs.load_into(model, path, backend=backend)
    for name, t in sd.items():
        want = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        got = getattr(model, name)
        assert got.dtype == want.dtype
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
    assert report.uploads > 4            # more batches than slots: every slot was reused
    assert 0 < report.staging_bytes      # 'wide_rows' has rows larger than a slot: the ring grew for them
    assert 0.0 <= report.overlap <= 1.0
    assert not _upload_threads()


def test_rows_fit_the_ring_when_rows_are_small(tmp_path, backend, forced):
    torch.manual_seed(1)
    sd = {f"w{i}": torch.randn(512, 256) for i in range(6)}  # 512 KiB each: two slots' worth
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    model = _buffers(sd, torch.bfloat16)
    report = gs.load_into(model, path, backend=backend)
    assert all(torch.equal(getattr(model, k), v.bfloat16()) for k, v in sd.items())
    assert report.staging_bytes <= MiB   # the budget holds: jobs were cut by rows to fit each slot
    assert report.uploads >= 6 * 256 * 1024 // (256 * 1024)


def test_non_contiguous_views_are_bit_exact(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("GEMMA_STREAM_STAGING_MB", "1")
    torch.manual_seed(2)
    sd = {"t": torch.randn(900, 700), "cols": torch.randn(800, 300)}
    path = str(tmp_path / "v.safetensors")
    save_file(sd, path)
    model = nn.Module()
    model.register_buffer("t", torch.zeros(700, 900, dtype=torch.bfloat16).t())   # transposed
    wide = torch.zeros(800, 500)
    model.register_buffer("cols", wide[:, 100:400])                               # a column slice
    report = gs.load_into(model, path, backend=backend)
    assert torch.equal(model.t, sd["t"].bfloat16())
    assert torch.equal(wide[:, 100:400], sd["cols"]) and not wide[:, :100].any() and not wide[:, 400:].any()
    assert report.uploads > 4 and report.staging_bytes <= MiB


def test_strided_source_split_by_rows(tmp_path, backend, forced):
    base = torch.randn(600, 800)
    view = base.t()[:, :500]  # non-contiguous storage in a torch zip checkpoint: a strided source
    path = str(tmp_path / "s.pt")
    torch.save({"v": view}, path)
    model = _buffers({"v": view.contiguous()})
    report = gs.load_into(model, path, backend=backend)
    assert torch.equal(model.v, view) and report.uploads > 1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_on_read_through_the_ring_is_bit_exact(tmp_path, backend, forced, scheme):
    torch.manual_seed(3)
    sd = {"a.weight": torch.randn(2000, 512), "b.weight": torch.randn(700, 256).bfloat16()}
    path = str(tmp_path / "q.safetensors")
    save_file(sd, path)
    with torch.device("meta"):
        model = nn.Module()
        model.a = nn.Linear(512, 2000, bias=False)
        model.b = nn.Linear(256, 700, bias=False)
    report = gs.load_into(model, path, quantize=scheme, group_size=64, backend=backend)
    assert report.uploads >= 3  # 'a' alone needs more than two 256 KiB slots (int4: 500 KiB + scales)
    for name in ("a", "b"):
        w = sd[f"{name}.weight"]
        module = getattr(model, name)
        if scheme == "int8":
            q, s = quantize_int8(w, module.weight_scaler.dtype)
            assert torch.equal(module.weight, q) and torch.equal(module.weight_scaler, s)
        else:
            state = module.state_dict()
            q, s, z = quantize_int4(w, 64, state["weight_scale"].dtype)
            assert torch.equal(state["weight"], q)
            assert torch.equal(state["weight_scale"], s) and torch.equal(state["weight_zero"], z)


def test_pack_keeps_quantized_rows_whole_and_slots_bounded(tmp_path):
    path = str(tmp_path / "p.safetensors")
    save_file({"w": torch.randn(300, 1000), "v": torch.randn(5000)}, path)
    targets = {"w": torch.empty(300, 1000, dtype=torch.bfloat16), "v": torch.empty(5000)}
    plan = make_plan(open_checkpoint(path), targets)
    batches = slots.pack(plan.jobs, 64 << 10)
    seen = {"w": 0, "v": 0}
    for batch in batches:
        assert sum(slots.need(j) for j in batch) <= 64 << 10
        for job in batch:
            assert job.dst.shape == job.shape
            seen[job.name] += job.shape[0]
    assert seen == {"w": 300, "v": 5000}


# ---------------------------------------------------------------- the ring's discipline

def test_ring_slot_is_refilled_only_after_its_copy_completed(tmp_path, backend, forced, monkeypatch):
    torch.manual_seed(4)
    sd = {f"w{i}": torch.randn(256, 1024) for i in range(4)}  # 4 MiB: 16 slot loads through 4 slots
    path = str(tmp_path / "r.safetensors")
    save_file(sd, path)
    events = []
    lock = threading.Lock()

    def hook(event: str, slot: int, seq: int) -> None:
        with lock:
            events.append((event, slot, seq))
        if event == "copy":
            time.sleep(0.01)  # slow uploads: a fill that did not wait would overwrite bytes not yet copied

    monkeypatch.setattr(staging, "debug_hook", hook)
    model = _buffers(sd)
    report = gs.load_into(model, path, backend=backend)
    assert all(torch.equal(getattr(model, k), v) for k, v in sd.items())
    fills = [(slot, seq) for event, slot, seq in events if event == "fill"]
    assert len(fills) == report.uploads >= 16
    for i, (event, slot, seq) in enumerate(events):
        if event == "fill" and seq >= staging.SLOTS:
            assert ("complete", slot, seq - staging.SLOTS) in events[:i], f"slot {slot} refilled early"
    # and the pipeline overlapped: some fill ran while an earlier slot was still being copied
    overlapped = any(event == "fill" and later > seq
                     for _, slot, seq in (e for e in events if e[0] == "copy")
                     for event, _, later in events[events.index(("copy", slot, seq)):
                                                   events.index(("complete", slot, seq))])
    assert overlapped and report.overlap > 0


# ---------------------------------------------------------------- errors and cancellation

def test_cancel_mid_pipeline_is_a_clear_error(tmp_path, backend, forced):
    path, sd = _mixed(tmp_path)
    model = _buffers(sd)
    calls = []

    def progress(done: int, total: int) -> bool:
        calls.append(done)
        return done < 2 * MiB

    with pytest.raises(gs.GemmaStreamError, match="cancelled by the progress callback") as info:
        gs.load_into(model, path, backend=backend, progress=progress)
    assert "partly written" in str(info.value) and max(calls) >= 2 * MiB
    assert not _upload_threads()


def test_file_truncated_mid_pipeline_is_a_checkpoint_error(tmp_path, backend, forced, monkeypatch):
    torch.manual_seed(5)
    sd = {f"w{i}": torch.randn(256, 1024) for i in range(4)}
    path = str(tmp_path / "t.safetensors")
    save_file(sd, path)
    events = []

    def hook(event: str, slot: int, seq: int) -> None:
        events.append((event, seq))
        if event == "fill" and seq == 6:  # after six slots were filled and shipped, the file loses its tail
            os.truncate(path, os.path.getsize(path) - 3 * MiB)

    monkeypatch.setattr(staging, "debug_hook", hook)
    with pytest.raises(gs.CheckpointError, match=r"t\.safetensors") as info:
        gs.load_into(_buffers(sd), path, backend=backend)
    assert "'w1'" in str(info.value) or "'w2'" in str(info.value) or "'w3'" in str(info.value)
    assert ("copy", 0) in events and not _upload_threads()


def test_upload_failure_names_the_tensor(tmp_path, backend, forced, monkeypatch):
    path, sd = _mixed(tmp_path)

    def broken(staged, region, name, non_blocking):
        raise gs.GemmaStreamError(f"tensor {name!r}: copying its staged bytes to cpu failed: boom")

    monkeypatch.setattr(staging, "_upload", broken)
    with pytest.raises(gs.GemmaStreamError, match="copying its staged bytes"):
        gs.load_into(_buffers(sd), path, backend=backend)
    assert not _upload_threads()


def test_mmap_mode_refuses_a_non_cpu_device(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.randn(4)}, path)
    with torch.device("meta"):
        model = nn.Module()
        model.register_buffer("w", torch.empty(4))
    with pytest.raises(ValueError, match="mode='mmap'.*cuda"):
        gs.load_into(model, path, mode="mmap", device="cuda")
    with pytest.raises(ValueError, match="mode='mmap'.*cuda:1"):
        gs.load_state_dict(path, mode="mmap", device=torch.device("cuda", 1))


def test_staging_budget_must_be_positive(monkeypatch):
    from gemma_stream.config import config
    monkeypatch.setenv("GEMMA_STREAM_STAGING_MB", "0")
    with pytest.raises(ValueError, match="GEMMA_STREAM_STAGING_MB"):
        config()


def test_plain_cpu_load_reports_no_staging(tmp_path, backend, monkeypatch):
    monkeypatch.delenv("GEMMA_STREAM_FORCE_STAGING", raising=False)
    path, sd = _mixed(tmp_path)
    report = gs.load_into(_buffers(sd), path, backend=backend)
    assert report.uploads == 0 and report.staging_bytes == 0 and report.overlap == 0.0


def test_forced_staging_load_state_dict_matches_safetensors(tmp_path, backend, forced):
    path, _ = _mixed(tmp_path)
    got = gs.load_state_dict(path, backend=backend)
    want = load_file(path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- host memory is the ring

_PEAK_CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import gemma_stream as gs
    from gemma_stream.formats import open_checkpoint

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    path, backend = sys.argv[1], sys.argv[2]
    model = nn.Module()
    for r in open_checkpoint(path).records:   # the model first: only the load's extra memory counts
        model.register_buffer(r.name, torch.ones(r.shape, dtype=r.dtype.torch))
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # reset VmHWM to the current RSS
    report = gs.load_into(model, path, backend=backend)
    print(json.dumps({"extra": status("VmHWM") - before, "staging_bytes": report.staging_bytes,
                      "uploads": report.uploads, "model": sum(b.nbytes for b in model.buffers())}))
""")


def test_host_peak_is_the_ring_not_the_model(tmp_path, backend):
    ring = 16 * MiB
    sd = {f"layer{i}": torch.randn(1024, 1024).bfloat16() for i in range(96)}  # 192 MiB: 12x the ring
    path = str(tmp_path / "big.safetensors")
    save_file(sd, path)
    del sd
    env = dict(os.environ, GEMMA_STREAM_FORCE_STAGING="1", GEMMA_STREAM_STAGING_MB=str(ring // MiB),
               GEMMA_STREAM_CHUNK_MB="4", GEMMA_STREAM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, path, backend], env=env, capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["model"] >= 10 * ring and got["uploads"] >= 12
    assert got["staging_bytes"] <= ring
    assert got["extra"] <= ring + 64 * MiB, got


# ---------------------------------------------------------------- the stream path, with a simulated device

class _FakeStream:
    """A device stream simulated by a worker thread: work runs later, in order, like a copy engine."""

    def __init__(self):
        self.queue: list = []
        self.cv = threading.Condition()
        self.waited_on: list = []
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.stopped = False
        self.worker.start()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.stopped:
                    self.cv.wait()
                if not self.queue:
                    return
                fn = self.queue.pop(0)
            fn()

    def enqueue(self, fn) -> None:
        with self.cv:
            self.queue.append(fn)
            self.cv.notify()

    def wait_stream(self, other) -> None:
        self.waited_on.append(other)

    def synchronize(self) -> None:
        done = threading.Event()
        self.enqueue(done.set)
        done.wait()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.worker.join()


class _FakeEvent:
    def __init__(self):
        self.done = threading.Event()
        self.at = 0.0

    def record(self, stream: _FakeStream) -> None:
        def fire():
            self.at = time.perf_counter()
            self.done.set()
        stream.enqueue(fire)

    def synchronize(self) -> None:
        self.done.wait()

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.at - self.at) * 1e3


def test_stream_uploader_refills_a_slot_only_after_its_event(tmp_path, backend, forced, monkeypatch):
    """The accelerator path's protocol, with copies that really run later: a slot refilled before
    its event fired would hand the simulated copy engine overwritten bytes."""
    torch.manual_seed(6)
    sd = {f"w{i}": torch.randn(256, 1024) for i in range(4)}
    path = str(tmp_path / "s.safetensors")
    save_file(sd, path)
    stream, current = _FakeStream(), object()
    active: list[_FakeStream] = []

    class Use:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            active.append(self.s)

        def __exit__(self, *exc):
            active.pop()

    def async_upload(staged, region, name, non_blocking):
        assert non_blocking and active == [stream]
        def copy():
            time.sleep(0.003)
            region.copy_(staged)
        active[-1].enqueue(copy)

    uploader = staging._StreamUploader(stream, current, _FakeEvent, Use)
    monkeypatch.setattr(staging, "_upload", async_upload)
    monkeypatch.setattr(staging, "_uploader", lambda device: uploader)
    events = []
    monkeypatch.setattr(staging, "debug_hook", lambda event, slot, seq: events.append((event, slot, seq)))
    try:
        model = _buffers(sd)
        report = gs.load_into(model, path, backend=backend)
    finally:
        stream.stop()
    assert stream.waited_on == [current]   # the copies start after the allocating stream's work
    assert all(torch.equal(getattr(model, k), v) for k, v in sd.items())
    assert report.uploads >= 16 and report.overlap > 0
    for i, (event, slot, seq) in enumerate(events):
        if event == "fill" and seq >= staging.SLOTS:
            assert ("complete", slot, seq - staging.SLOTS) in events[:i]


# ---------------------------------------------------------------- models built on meta, and the GPU check's CPU part

def test_meta_model_with_tied_weights_through_the_ring(tmp_path, backend, forced):
    torch.manual_seed(7)
    emb = torch.randn(3000, 128)
    path = str(tmp_path / "tied.safetensors")
    save_file({"embed.weight": emb, "norm": torch.randn(128)}, path)
    with torch.device("meta"):
        model = nn.Module()
        model.embed = nn.Embedding(3000, 128)
        model.head = nn.Linear(128, 3000, bias=False)
        model.head.weight = model.embed.weight   # tied: one Parameter, two names
        model.register_buffer("norm", torch.empty(128))
    report = gs.load_into(model, path, backend=backend, strict=False)
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, nn.Parameter)
    assert model.embed.weight.device.type == "cpu" and torch.equal(model.embed.weight, emb)
    assert report.uploads >= 2 and not report.missing_keys


def test_gpu_check_cpu_part_runs_and_verifies(tmp_path):
    from gemma_stream.benchmark import gpu
    out = tmp_path / "check.json"
    assert gpu.main(["--size", "tiny", "--cases", "gs_int8", "--dir", str(tmp_path / "data"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["gs_int8"]
    assert rows[0]["verify"]["equal"] and rows[0]["staging_bytes"] > 0 and rows[0]["uploads"] >= 1


def test_overlap_measures_the_shorter_activity_hidden_behind_the_other():
    assert staging.overlap([(0, 2), (2, 4)], [(1, 3)]) == 1.0             # uploads wholly inside fills
    assert staging.overlap([(0, 1), (2, 3)], [(1, 2), (3, 4)]) == 0.0     # strictly alternating
    assert staging.overlap([(0, 4)], [(3, 5)]) == 0.5                     # half of the uploads hidden
    assert staging.overlap([(0, 1), (0.5, 2)], []) == 0.0
