"""The benchmark harness at the tiny size: files it writes, the table and the JSON of one real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import gemma_stream as gs
from gemma_stream.benchmark import SIZES, GemmaShaped, parse_size, tensor_specs
from gemma_stream.benchmark import writers
from gemma_stream.benchmark.bounds import _pieces, _split
from gemma_stream.benchmark.shapes import module_from_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = SIZES["tiny"]


def test_sizes_are_the_real_gemma_shapes():
    assert SIZES["2b"].params() == 2_506_172_416      # Gemma 2B: 2.51B params
    assert SIZES["7b"].params() == 8_537_680_896      # Gemma 7B: 8.54B params
    one_gib = parse_size("1")
    assert abs(one_gib.nbytes(2) - 2**30) < 0.01 * 2**30
    three = parse_size("3gib")
    assert three.vocab == 256000 and abs(three.nbytes(2) - 3 * 2**30) < 0.05 * 2**30
    with pytest.raises(ValueError, match="expected one of"):
        parse_size("huge")


@pytest.mark.parametrize("naming", ["hf", "gemma_pytorch"])
def test_model_class_matches_the_tensor_list(naming):
    with torch.device("meta"):
        model = GemmaShaped(TINY, torch.bfloat16, naming)
    assert sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()) == sorted(tensor_specs(TINY, naming))
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_written_files_agree_with_the_reference_readers(tmp_path, dtype):
    single = tmp_path / "model.safetensors"
    writers.write_safetensors(str(single), TINY, dtype)
    shards = writers.write_sharded(str(tmp_path), TINY, dtype, max_shard_bytes=1_500_000)
    ckpt = tmp_path / "model.ckpt"
    writers.write_ckpt(str(ckpt), TINY, dtype)
    reference = load_file(str(single))
    assert {k: tuple(v.shape) for k, v in reference.items()} == dict(tensor_specs(TINY, "hf"))
    assert reference["model.embed_tokens.weight"].dtype == dtype
    assert 0.9 < float(reference["model.layers.1.mlp.up_proj.weight"].float().std()) < 1.1   # Gaussian
    assert not torch.equal(reference["model.layers.0.mlp.up_proj.weight"], reference["model.layers.1.mlp.up_proj.weight"])
    assert len(shards) > 1
    sharded = {}
    for path in shards:
        sharded.update(load_file(path))
    assert sharded.keys() == reference.keys() and all(torch.equal(sharded[k], reference[k]) for k in reference)
    # gemma_pytorch layout: {"model_state_dict": ...}, embedder, fused qkv = cat(q, k, v)
    state = torch.load(str(ckpt), weights_only=True)["model_state_dict"]
    assert torch.equal(state["embedder.weight"], reference["model.embed_tokens.weight"])
    for i in range(TINY.layers):
        qkv = torch.cat([reference[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(state[f"model.layers.{i}.self_attn.qkv_proj.weight"], qkv)
        assert torch.equal(state[f"model.layers.{i}.mlp.down_proj.weight"],
                           reference[f"model.layers.{i}.mlp.down_proj.weight"])


def test_eviction_empties_the_page_cache(tmp_path):
    path = tmp_path / "model.safetensors"
    writers.write_safetensors(str(path), TINY, torch.bfloat16)
    writers.warm_up([str(path)])
    assert writers.cached_fraction([str(path)]) > 0.99
    writers.evict([str(path)])
    assert writers.cached_fraction([str(path)]) < 0.05


def test_bound_pieces_cover_every_byte_once(tmp_path):
    paths = []
    for i, size in enumerate([(64 << 20) * 2 + 5, 4097, 1]):
        path = tmp_path / f"f{i}"
        with open(path, "wb") as f:
            f.truncate(size)
        paths.append(str(path))
    for align in (1, 4096):
        pieces, alloc = _pieces(paths, align)
        halves = _split(pieces, 2)
        assert [p for h in halves for p in h] == pieces and all(halves)
        covered = {}
        for index, offset, length, buf_offset in pieces:
            assert length % align == 0 and buf_offset % align == 0 and offset % align == 0
            covered[index] = covered.get(index, 0) + min(length, os.path.getsize(paths[index]) - offset)
            assert buf_offset + length <= alloc
        assert covered == {i: os.path.getsize(p) for i, p in enumerate(paths)}


def test_module_from_specs_builds_linear_layers():
    specs = [("embed_tokens.weight", (10, 4), torch.bfloat16), ("blocks.0.proj.weight", (8, 4), torch.bfloat16),
             ("blocks.0.proj.bias", (8,), torch.bfloat16), ("blocks.0.scale", (4,), torch.float32), ("step", (), torch.int64)]
    with torch.device("meta"):
        model = module_from_specs(specs)
    assert isinstance(model.embed_tokens, torch.nn.Embedding)
    assert isinstance(model.get_submodule("blocks.0.proj"), torch.nn.Linear)
    assert {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()} == {n: (s, d) for n, s, d in specs}


def test_bench_tiny_table_and_json(tmp_path):
    """One real run: two loaders, each in its own process; every field the RESULTS tables quote is there."""
    loader = "gs_native" if gs.native_available() else "gs_python"
    report = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))  # the gemma_stream under test
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_load.py"), "--size", "tiny",
                           "--loaders", f"{loader},safetensors", "--workdir", str(tmp_path / "work"),
                           "--json", str(report), "--targets"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "gemma_stream load_into" in out and "safetensors load_model" in out
    assert "peak/model" in out and "vs st" in out and "warm (file in the page cache)" in out
    assert "peak <= 1.03 x model + 64 MiB: not measured" in out and "warm >= 2x faster than safetensors" in out
    doc = json.loads(report.read_text())
    assert doc["mode"] == "warm" and doc["workload"]["model_bytes"] == TINY.nbytes(2)
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["torch"] == torch.__version__
    rows = {r["loader"]: r for r in doc["rows"]}
    assert set(rows) == {loader, "safetensors"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["gb_per_s"] > 0 and row["hwm_reset"] is True
        assert row["peak_bytes"] < 3 * TINY.nbytes(2) + (64 << 20)
        assert row["model_bytes"] == TINY.nbytes(2)
        assert row["resident"] and row["runs"][0]["cached_before"] > 0.99
    # both loaders saw the same weights
    assert rows[loader]["check"] == pytest.approx(rows["safetensors"]["check"])
    assert rows[loader]["backend"] == loader[3:]
    targets = {t["text"]: t for t in doc["targets"]}
    assert any("peak <= 1.03" in text for text in targets)
    assert all(t["met"] in (True, False, None) for t in targets.values())


def test_unavailable_loader_is_reported_not_skipped(tmp_path):
    """A loader that cannot read the format is a table row that says why."""
    from gemma_stream.benchmark.runner import availability, synthetic_workload

    workload = synthetic_workload(TINY, "bf16", "ckpt", str(tmp_path))
    assert "cannot read a ckpt" in availability("transformers", workload, None)
    assert availability("twostep_torch", workload, None) == "needs --quantize"
    assert availability("gs_python", workload, None) is None


def test_scaling_table_spread_and_a_size_too_big_to_run_warm():
    """GB/s per size; a size whose file and model cannot both be in memory has no warm row."""
    from gemma_stream.benchmark.cli import _scaling_table

    def row(seconds, nbytes):
        return {"status": "ok", "seconds": seconds, "min_seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
                "loader": "gs_native", "label": "gemma_stream load_into (native)", "peak_over_model": 1.0,
                "message": ""}

    small, big = 2 * 10**9, 17 * 10**9
    results = [{"size": "1b", "model_bytes": small, "data_bytes": small,
                "warm": [row(0.5, small)], "cold": [row(2.0, small)]},
               {"size": "7b", "model_bytes": big, "data_bytes": big, "warm_skipped": "file + model exceed",
                "cold": [row(21.25, big)]}]
    table = _scaling_table(results, targets=True)
    assert "7b     warm: not measured, file + model exceed" in table
    assert "n/a" in table.splitlines()[2]
    assert "[MISS] gemma_stream load_into (native), cold: 20%" in table, table   # 1.0 vs 0.8 GB/s
    assert "native), warm:" not in table                                       # one size only: no spread
    plain = _scaling_table(results)   # what a user sees: the spread, no project targets
    assert "  gemma_stream load_into (native), cold: 20%" in plain and "MISS" not in plain and "issue" not in plain


def _bench(*args, tmp_path, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    return subprocess.run([sys.executable, "-m", "gemma_stream", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=120, stdin=stdin, cwd=tmp_path)


def test_bench_tiny_user_output_fits_its_units_and_has_no_project_targets(tmp_path):
    loader = "gs_native" if gs.native_available() else "gs_python"
    proc = _bench("--synthetic", "tiny", "--loaders", loader, "--workdir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = proc.stderr.splitlines()[0]   # the size comes first, before anything is written
    assert said.startswith("bench: Gemma-tiny shape (2.95M params), bf16 safetensors: 5.6 MiB written to ")
    assert "a load needs up to 5.6 MiB of memory; 1 loaders x 1 run" in said
    assert "0.00B" not in proc.stdout and "0.00 GiB" not in proc.stdout and "GiB" not in proc.stdout.splitlines()[0]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("gemma_stream load_into"))
    assert " MiB " in row and row.split()[-2:] == ["-", "-"]   # peak/model and resident: not at this size
    assert "too small to measure peak memory" in proc.stdout
    assert "MISS" not in proc.stdout and "MET" not in proc.stdout and "issue" not in proc.stdout


def test_bench_without_a_target_refuses_instead_of_writing_gigabytes(tmp_path):
    proc = _bench(tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gemma-stream: error: bench: name what to benchmark: a checkpoint PATH, or "
                                  "--synthetic SIZE") and "writes 4.7 GiB to disk" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_without_a_target_asks_on_a_terminal(monkeypatch, capsys):
    from gemma_stream.benchmark import cli as bench_cli

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    answers = iter(["", "tiny"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    with pytest.raises(SystemExit, match="cancelled"):
        bench_cli._ask_size()
    assert bench_cli._ask_size() == "tiny"
    assert "writes 4.7 GiB to disk" in capsys.readouterr().out


def _row(loader, seconds, peak, model=2 << 30, others=0.0):
    from gemma_stream.benchmark.runner import Row
    runs = [{"seconds": s, "peak_bytes": peak, "model_bytes": model, "others_cpu": others} for s in seconds]
    return Row(loader, loader, "loader", runs=runs)


def test_demo_verdict_says_slower_when_slower_and_busy_on_the_same_line():
    from gemma_stream.benchmark.cli import demo_verdict

    gib = 1 << 30
    slower = demo_verdict(_row("gs", [1.4, 9.0, 1.3], 2 * gib), _row("tl", [1.0, 1.0, 0.9], 4 * gib))
    assert slower == ("gemma_stream: 1.4x slower than torch.load + load_state_dict (median of 3 loads each), "
                      "with 2.0x less peak memory.")
    faster = demo_verdict(_row("gs", [0.5, 0.6, 0.4], 2 * gib, others=0.3), _row("tl", [2.0] * 3, 4 * gib))
    assert faster.startswith("gemma_stream: 4.0x faster than ") and faster.count("\n") == 0
    assert faster.endswith("; the machine was busy (other processes used up to 30% of the CPUs during a load), "
                           "so these timings are indicative.")
    same = demo_verdict(_row("gs", [1.0], 2 * gib), _row("tl", [1.02], 2 * gib))
    assert same == ("gemma_stream: as fast as torch.load + load_state_dict (within 5%) (one load each), "
                    "with the same peak memory.")
    tiny = demo_verdict(_row("gs", [0.01], 5 << 20, model=5 << 20), _row("tl", [0.1], 11 << 20, model=5 << 20))
    assert "memory not compared (a 5.0 MiB model is too small to measure)" in tiny


# ---------------------------------------------------------------- checkpoint mixes (issue 15)

def test_mixes_have_the_sizes_and_tensor_mixes_they_promise():
    import math
    from gemma_stream.benchmark.mixes import MIXES, mix_specs, parse_mix_size

    def nbytes(specs):
        return [math.prod(s) * 2 for _, s in specs]
    mib, gib = 1 << 20, 1 << 30
    few = mix_specs("few_large", 2 * gib)   # the layout of issue 15's check, exactly
    sizes = dict(zip([n for n, _ in few], nbytes(few)))
    assert sizes["model.embed_tokens.weight"] == 512 * mib - 9 * 8192   # 9 rows give way to the 9 norms
    projections = [v for k, v in sizes.items() if "proj" in k]
    assert len(projections) == 4 * 7 and all(48 * mib <= v <= 64 * mib for v in projections)
    assert all(v <= 8192 for k, v in sizes.items() if "norm" in k) and sum(sizes.values()) == 2 * gib
    many = mix_specs("many_small", parse_mix_size("1"))
    assert len(many) > 2000 and max(nbytes(many)) < mib and abs(sum(nbytes(many)) - gib) < 0.02 * gib
    for mix in MIXES:
        for size in ("1", "2", "5"):
            total = sum(nbytes(mix_specs(mix, parse_mix_size(size))))
            assert abs(total - parse_mix_size(size)) < 0.03 * parse_mix_size(size), (mix, size)
        tiny = mix_specs(mix, parse_mix_size("tiny"))
        assert 1 * mib < sum(nbytes(tiny)) < 8 * mib and len({n for n, _ in tiny}) == len(tiny)
    from gemma_stream.benchmark.matrix import shard_limit
    for mix in MIXES:   # the HF directory of every cell has 3+ files, whatever its largest tensor
        for size in ("tiny", "1", "2", "5"):
            specs = mix_specs(mix, parse_mix_size(size))
            assert 3 <= len(writers.plan_shards(specs, 2, shard_limit(specs))) <= 8, (mix, size)
    biggest_7b = max(nbytes(mix_specs("gemma7b", 5 * gib)))
    assert biggest_7b == 256000 * 3072 * 2   # the real 7B embedding from 2 GiB up
    with pytest.raises(ValueError, match="expected one of"):
        mix_specs("medium", gib)


def test_mix_cell_files_hold_the_same_tensors_in_three_formats(tmp_path):
    from gemma_stream.benchmark.matrix import write_cell_files
    from gemma_stream.benchmark.mixes import mix_specs, parse_mix_size

    formats = write_cell_files(str(tmp_path / "cell"), "many_small", parse_mix_size("tiny"))
    single = load_file(formats["safetensors"]["data"][0])
    assert list(single) == [n for n, _ in mix_specs("many_small", parse_mix_size("tiny"))]
    assert len(formats["sharded"]["data"]) >= 3
    sharded = {}
    for path in formats["sharded"]["data"]:
        sharded.update(load_file(path))
    zipped = torch.load(formats["zip"]["path"], weights_only=True, mmap=True)
    for name, tensor in single.items():
        assert torch.equal(sharded[name], tensor) and torch.equal(zipped[name], tensor), name
    assert write_cell_files(str(tmp_path / "cell"), "many_small", parse_mix_size("tiny")) == formats   # reused


def test_mix_cell_files_follow_the_write_order(tmp_path):
    from gemma_stream.benchmark.matrix import write_cell_files
    from gemma_stream.benchmark.mixes import parse_mix_size

    formats = write_cell_files(str(tmp_path / "cell"), "many_small", parse_mix_size("tiny"),
                               ("zip", "sharded", "safetensors"))
    written = {fmt: min(os.stat(p).st_mtime_ns for p in f["data"]) for fmt, f in formats.items()}
    assert written["zip"] <= written["sharded"] <= written["safetensors"]
    # files written in another order are not reused as this order's
    again = write_cell_files(str(tmp_path / "cell"), "many_small", parse_mix_size("tiny"))
    assert min(os.stat(p).st_mtime_ns for p in again["safetensors"]["data"]) > written["safetensors"]
    with pytest.raises(SystemExit, match="write-order"):
        write_cell_files(str(tmp_path / "other"), "many_small", parse_mix_size("tiny"), ("zip", "zip", "sharded"))


def _cell(runs_a, runs_b, state="cold"):
    def entry(loader, fmt, runs):
        return {"loader": loader, "format": fmt, "label": loader, "errors": [], "skipped": None,
                "runs": [{"seconds": s, "peak_bytes": 1 << 20, "check": 1.5} if s else None for s in runs]}
    return {"mix": "few_large", "size": "2gib", "nbytes": 2 << 30, "state": state, "tensors": 38,
            "data_bytes": 2 << 30, "files": {},
            "entries": {"gs_native@safetensors": entry("gs_native", "safetensors", runs_a),
                        "pread_2t_4k@safetensors": entry("pread_2t_4k", "safetensors", runs_b)}}


def test_mix_ratios_are_taken_within_each_round():
    from gemma_stream.benchmark.matrix import summarize
    from gemma_stream.benchmark.matrix_report import format_cells, render_markdown

    # round 2 is slow for both (a busy machine): per round the ratio holds at 0.9; a ratio of the
    # medians would say 1.5 / 2.0 = 0.75, and a failed round drops out of the ratios only
    cell = summarize(_cell([1.0, 4.0, 1.0, None], [0.9, 3.6, 0.9, 0.9]))
    ratio = cell["ratios"]["copy, of the 2-thread bound (safetensors)"]
    assert ratio["values"] == pytest.approx([0.9, 0.9, 0.9]) and ratio["median"] == pytest.approx(0.9)
    assert ratio["target"] == 0.95 and ratio["n"] == 3
    assert cell["entries"]["gs_native@safetensors"]["seconds"]["median"] == 1.0 and cell["checks_agree"]
    assert "copy vs safetensors load_model" not in cell["ratios"]   # no safetensors entry in this cell
    text = format_cells([cell])
    assert "few_large 2gib (38 tensors, 2.0 GiB), cold:" in text and "0.90 (0.90-0.90)  (target >= 0.95)" in text
    warm = summarize(_cell([1.0, 1.0], [1.0, 0.5], state="warm"))
    table = render_markdown({"cells": [cell, warm], "rounds": 4, "command": ["bench_mixes.py", "--sizes", "2"]})
    header, rule, row = table.splitlines()[:3]
    assert header.startswith("| mix | size | tensors | cold copy, of bound | warm copy, of bound |")
    assert row.startswith("| few_large | 2gib | 38 | 0.90 (0.90-0.90) | 0.75 (0.50-1.00) | - |")
    assert "`bench_mixes.py --sizes 2`" in table


def test_mix_entries_are_checked():
    from gemma_stream.benchmark.matrix import Entry

    assert Entry.parse("torch_load_mmap_assign@zip").key == "torch_load_mmap_assign@zip"
    for bad, message in [("torch_load_mmap_assign@safetensors", "reads ckpt files"), ("gs_native@gguf", "format"),
                         ("nope@zip", "unknown loader"), ("transformers@sharded", "config")]:
        with pytest.raises(SystemExit, match=message):
            Entry.parse(bad)


def test_mix_matrix_runs_warm_and_cold_at_tiny_size(tmp_path):
    """The whole command, 2 rounds at the tiny size (3 entries, to keep the suite quick): JSON and tables."""
    loader = "gs_native" if gs.native_available() else "gs_python"
    out = tmp_path / "mixes.json"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_mixes.py"), "--sizes", "tiny",
                           "--rounds", "2", "--mixes", "few_large", "--workdir", str(tmp_path / "work"),
                           "--entries", f"{loader}@safetensors,{loader}@zip,pread_2t_4k@safetensors",
                           "--json", str(out), "--markdown"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "gemma_stream.bench_mixes/1" and doc["rounds"] == 2
    assert [(c["mix"], c["size"], c["state"]) for c in doc["cells"]] == [("few_large", "tiny", "warm"),
                                                                          ("few_large", "tiny", "cold")]
    for cell in doc["cells"]:
        assert cell["checks_agree"] and cell["tensors"] == 11
        for entry in cell["entries"].values():
            assert entry["status"] == "ok" and entry["seconds"]["n"] == 2 and entry["peak_bytes"] > 0
            cached = [r["cached_before"] for r in entry["runs"]]
            assert all(c > 0.99 for c in cached) if cell["state"] == "warm" else all(c < 0.05 for c in cached)
        if loader == "gs_native":
            assert set(cell["ratios"]) == {"copy, of the 2-thread bound (safetensors)",
                                           "copy, zip vs safetensors (GB/s)"}
            assert all(r["n"] == 2 and r["median"] > 0 for r in cell["ratios"].values())
    assert "| few_large | tiny | 11 |" in proc.stdout and "wrote " in proc.stdout
    assert not (tmp_path / "work" / "few_large-tiny").exists()   # each cell's files removed after it


# ---------------------------------------------------------------- the scripts in benchmarks/ are front ends

def _script(name: str, *args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)


def test_big_model_script_runs_on_tiny_shapes(tmp_path):
    backend = "native" if gs.native_available() else "python"
    proc = _script("big_model.py", "--tiny", "--backend", backend, "--json", str(tmp_path / "big.json"),
                   "--dir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "big.json").read_text())["rows"]
    assert [(r["case"], r["quantize"], r["status"]) for r in rows] == [("gemma-tiny-as-7b", "none", "ok"),
                                                                       ("gemma-tiny-as-7b", "int8", "ok")]
    assert rows[0]["model_bytes"] == TINY.nbytes(2) and rows[1]["model_bytes"] < TINY.nbytes(2)
    assert min(rows[1]["sqnr_db"].values()) > 35   # int8 on Gaussian weights: about 40 dB
    assert all(r["runs"][0]["cached_before"] < 0.05 for r in rows)   # cold by default


def test_engine_probe_script_maps_its_cases_onto_the_harness(tmp_path):
    proc = _script("engine_probe.py", "--dir", str(tmp_path / "probe"), "--size", "tiny", "--cases",
                   "bound,gs_python@sd@drop@c4", "--states", "cold", "--repeat", "1", "--wait-idle", "0",
                   "--json", str(tmp_path / "probe.json"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["case"]: r for r in json.loads((tmp_path / "probe.json").read_text())["rows"]}
    assert set(rows) == {"bound", "gs_python@sd@drop@c4"}
    assert rows["gs_python@sd@drop@c4"]["cached_after"] < 0.05   # cache="drop" reached the load
    assert "# gs_python@sd@drop@c4 cold: " in proc.stdout and "x of bound" in proc.stdout
    from gemma_stream.benchmark.child import LOADERS
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import engine_probe
    finally:
        sys.path.pop(0)
    args = type("Args", (), {"mode": "copy", "cache": "auto", "api": "into", "threads": 0, "alt_path": "/alt",
                             "size": "tiny", "model_dtype": "bfloat16", "dir": str(tmp_path)})()
    spec, pythonpath = engine_probe.case_spec(args, "alt_gs_native@mmap@t3@c8@touch", "x.safetensors")
    assert pythonpath == "/alt" and spec["loader"] in LOADERS and spec["touch"] and spec["threads"] == 3
    assert spec["options"] == {"backend": "native", "mode": "mmap", "cache": "auto", "api": "load_into"}
    assert spec["env"] == {"GEMMA_STREAM_CHUNK_MB": "8"}
    with pytest.raises(SystemExit, match="unknown suffix"):
        engine_probe.case_spec(args, "gs_native@fast", "x.safetensors")


def test_load_phases_script_times_each_phase(tmp_path):
    """benchmarks/load_phases.py: one fresh process per load, every phase of load_into timed; a torch
    zip's reader phases too."""
    from gemma_stream.benchmark.matrix import write_cell_files
    from gemma_stream.benchmark.mixes import parse_mix_size
    files = write_cell_files(str(tmp_path / "cell"), "many_small", parse_mix_size("tiny"))
    proc = _script("load_phases.py", "--mix", "many_small", "--size", "tiny", "--rounds", "1", "--rewarm",
                   files["safetensors"]["path"], files["zip"]["path"], tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single, zipped = proc.stdout.split(files["zip"]["path"])
    for phase in ("total", "_open", "make_plan", "materialize", "_execute"):
        assert f"  {phase} " in single and f"  {phase} " in zipped
    assert "zip.walk_pickle" in zipped and "zip.walk_pickle" not in single
    # --cold: every file evicted before each load, the same phases timed
    proc = _script("load_phases.py", "--mix", "many_small", "--size", "tiny", "--rounds", "1", "--cold",
                   files["zip"]["path"], tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "zip.walk_pickle" in proc.stdout and "  _execute " in proc.stdout
    proc = _script("load_phases.py", "--cold", "--rewarm", files["zip"]["path"], tmp_path=tmp_path)
    assert proc.returncode != 0 and "not allowed with" in proc.stderr


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not hasattr(os, "wait4"), reason="posix_fadvise, wait4")
def test_cold_cpu_probe_reports_each_load_with_its_cpu(tmp_path):
    """benchmarks/cold_cpu_probe.py: the bound, keep and drop, each cold in a fresh process, with the
    child's CPU seconds and page faults; every load must have run (a failed child fails the probe)."""
    from gemma_stream.benchmark.matrix import write_cell_files
    from gemma_stream.benchmark.mixes import parse_mix_size
    files = write_cell_files(str(tmp_path / "cell"), "gemma7b", parse_mix_size("tiny"))
    proc = _script("cold_cpu_probe.py", files["safetensors"]["path"], "--mix", "gemma7b", "--size", "tiny",
                   "--rounds", "1", "--idle", "0", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert [r[2] for r in rows] == ["bound", "keep", "drop"]
    for r in rows:
        assert float(r[3]) > 0 and r[5] == "user" and float(r[9]) >= 0 and int(r[13]) > 0
    proc = _script("cold_cpu_probe.py", str(tmp_path / "missing.safetensors"), "--rounds", "1", tmp_path=tmp_path)
    assert proc.returncode != 0


def test_reader_benchmark_measures_both_formats():
    from gemma_stream.benchmark.readers import run_readers
    out = run_readers(tensors=60, repeat=1, load=True)
    assert out["tensors"] == 60 and out["data_pkl_bytes"] > 60 * 50
    assert all(out[k] > 0 for k in ("walk_seconds", "walk_general_seconds", "open_safetensors_seconds",
                                    "open_sharded_seconds", "open_zip_seconds", "load_safetensors_seconds",
                                    "load_zip_seconds", "load_into_main_thread_safetensors_seconds",
                                    "load_into_main_thread_sharded_seconds", "load_into_main_thread_zip_seconds"))
    assert out["zip_over_safetensors"] == out["open_zip_seconds"] / out["open_safetensors_seconds"]


def test_a_benchmark_child_imports_the_build_it_is_given_and_no_other(tmp_path):
    """``runner.child_command``: a build on PYTHONPATH alone lost to an editable install's finder
    (both sides of an A/B ran the same tree, NOTES.md 38); the child now imports ``root``'s
    package, with bytecode compiled first, or fails saying where it came from."""
    from gemma_stream.benchmark.runner import child_command

    build = tmp_path / "build_b" / "gemma_stream"
    build.mkdir(parents=True)
    (build / "__init__.py").write_text("WHICH = 'build b'\n")
    (build / "lazy.py").write_text("X = 1\n")
    out = subprocess.run(child_command(str(build.parent), "print(gemma_stream.WHICH, sys.argv[1:])", "arg"),
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(build.parent)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "build b ['arg']"
    assert list((build / "__pycache__").glob("lazy.*.pyc"))      # compiled as an installed wheel is
    # without PYTHONPATH too: the path finder, which finds the checkout first, must not be dropped
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(child_command(str(build.parent), "print(gemma_stream.WHICH)"), capture_output=True,
                         text=True, env=env)
    assert (out.returncode, out.stdout.strip()) == (0, "build b"), out.stderr

    empty = tmp_path / "no_build"
    empty.mkdir()
    out = subprocess.run(child_command(str(empty), "print('ran')"), capture_output=True, text=True)
    assert out.returncode != 0 and "ran" not in out.stdout
    assert "not " + str(empty) in out.stderr or "No module named 'gemma_stream'" in out.stderr


def test_mix_variants_script_runs_named_variants_with_their_env_and_build(tmp_path):
    """benchmarks/mix_variants.py: a few entries of one cell over many rounds; a variant's env reaches
    its child, a variant naming another build runs that build (here a folder without one: it fails)."""
    proc = _script("mix_variants.py", "--mix", "many_small", "--size", "tiny", "--format", "sharded", "--rounds", "2",
                   "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "v.json"),
                   "bound=pread_2t_4k", "gs=gs_native:GEMMA_STREAM_PREFETCH=off", "mmap=gs_mmap#zip",
                   tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((tmp_path / "v.json").read_text())
    assert out["format"] == "sharded" and out["state"] == "cold"
    assert {k: len(v) for k, v in out["seconds"].items()} == {"bound": 2, "gs": 2, "mmap": 2}
    assert [v["entry"] for v in out["variants"]] == ["pread_2t_4k@sharded", "gs_native@sharded", "gs_mmap@zip"]
    assert out["variants"][1]["env"] == {"GEMMA_STREAM_PREFETCH": "off"}
    assert "  gs " in proc.stdout and "round 2:" in proc.stdout
    (tmp_path / "nobuild").mkdir()
    proc = _script("mix_variants.py", "--mix", "many_small", "--size", "tiny", "--rounds", "1",
                   "--workdir", str(tmp_path / "w"), f"gs=gs_native@{tmp_path / 'nobuild'}", tmp_path=tmp_path)
    assert proc.returncode != 0
    proc = _script("mix_variants.py", "--size", "tiny", "gs=no_such_loader", tmp_path=tmp_path)
    assert proc.returncode != 0 and "unknown loader" in proc.stderr
