"""The gemma-stream command, run as a subprocess on small generated checkpoints.

Outputs are checked against the files themselves (bytes at the reported offsets,
hashlib digests, the reference quantizers), not against our own readers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import fcntl
import pty
import struct
import subprocess
import termios
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream
from gemma_stream import cli, verify
from gemma_stream.quant import quantize_int4, quantize_int8

PACKAGE_ROOT = str(Path(gemma_stream.__file__).resolve().parent.parent)


def run_cli(*args, check_rc: int | None = 0, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gemma_stream", *map(str, args)], env=env, text=True,
                          capture_output=True, timeout=120, **kwargs)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.stdout, proc.stderr)
    return proc


def call_cli(capsys, *args) -> subprocess.CompletedProcess:
    """``cli.main`` in this process (quicker than a subprocess) with the same result shape."""
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-stream: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    out = {}
    single = {"model.embed_tokens.weight": torch.randn(64, 32).bfloat16(),
              "model.layers.0.mlp.up_proj.weight": torch.randn(48, 32).bfloat16(),
              "model.norm.weight": torch.ones(32), "rope.inv_freq": torch.rand(8, dtype=torch.float64)}
    out["single"] = root / "single.safetensors"
    save_file(single, out["single"], metadata={"format": "pt", "origin": "test"})

    shards = root / "sharded"
    shards.mkdir()
    parts = {"model-00001-of-00002.safetensors": {"a.weight": torch.randn(10, 12), "step": torch.arange(3)},
             "model-00002-of-00002.safetensors": {"b.weight": torch.randn(5, 4).half()}}
    for name, tensors in parts.items():
        save_file(tensors, shards / name)
    weight_map = {t: name for name, tensors in parts.items() for t in tensors}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                     "weight_map": weight_map}))
    out["sharded"] = shards

    w = torch.randn(16, 8)
    state = {"embedder.weight": w, "lm_head.weight": w, "proj.weight": torch.randn(6, 8).t(),
             "rows": w[4:8], "freqs_cis": torch.polar(torch.ones(4, 2), torch.zeros(4, 2))}
    out["ckpt"] = root / "model.ckpt"
    torch.save({"model_state_dict": state, "epoch": 3}, out["ckpt"])
    # the same views without the complex buffer (our safetensors reader has no C64), converted
    del state["freqs_cis"]
    out["ckpt_real"] = root / "real.ckpt"
    torch.save({"model_state_dict": state}, out["ckpt_real"])
    out["ckpt_as_safetensors"] = root / "from_ckpt.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, out["ckpt_as_safetensors"])

    weight, table = torch.randn(64, 128), torch.randn(40, 64)
    out["ref"] = root / "ref.safetensors"
    save_file({"l.weight": weight, "emb.weight": table, "n.weight": torch.ones(64)}, out["ref"])
    out["ref_bf16"] = root / "ref_bf16.safetensors"
    save_file({"l.weight": weight.bfloat16(), "emb.weight": table.bfloat16(),
               "n.weight": torch.ones(64).bfloat16()}, out["ref_bf16"])
    q8, s8 = quantize_int8(weight)
    q4, s4, z4 = quantize_int4(table, group_size=32)
    out["quant"] = root / "quant.safetensors"
    save_file({"l.weight": q8, "l.weight_scaler": s8, "emb.weight": q4, "emb.weight_scale": s4,
               "emb.weight_zero": z4, "n.weight": torch.ones(64)}, out["quant"])
    changed = weight.clone()
    changed[3, 5] += 0.5
    out["changed"] = root / "changed.safetensors"
    save_file({"l.weight": changed, "emb.weight": table[:20].clone(), "extra": torch.ones(2)}, out["changed"])

    raw = out["single"].read_bytes()
    out["truncated"] = root / "truncated.safetensors"
    out["truncated"].write_bytes(raw[:len(raw) - 100])
    out["bad_header"] = root / "bad_header.safetensors"
    out["bad_header"].write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, 3]} ...')
    out["truncated_ckpt"] = root / "truncated.ckpt"
    out["truncated_ckpt"].write_bytes(out["ckpt"].read_bytes()[:600])
    return out


def _bytes_at(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# ---------------------------------------------------------------- inspect

def test_inspect_table(files):
    proc = run_cli("inspect", files["single"])
    out = proc.stdout
    assert proc.stderr == ""  # no logging, no bar: stderr is not a terminal
    assert f"checkpoint  {files['single']}" in out and "format      safetensors, 1 file," in out
    header = next(line for line in out.splitlines() if line.startswith("name "))
    assert header.split() == ["name", "dtype", "shape", "MiB", "file", "offset"]
    row = next(line for line in out.splitlines() if line.startswith("model.embed_tokens.weight "))
    name, dtype, *shape, mib, file, offset = row.split()
    assert (dtype, " ".join(shape), mib, file) == ("bf16", "[64, 32]", "0.00", "single.safetensors")
    from safetensors import safe_open
    with safe_open(files["single"], "pt") as f:
        expected = f.get_tensor("model.embed_tokens.weight")
    assert _bytes_at(files["single"], int(offset), 64 * 32 * 2) == expected.view(torch.uint8).numpy().tobytes()
    totals = {line.split()[0]: line.split()[1:] for line in out.split("dtype  tensors")[1].splitlines()[1:5]}
    assert totals["bf16"] == ["2", "3,584", "0.01"] and totals["total"][:2] == ["4", "3,624"]
    metadata = out.split("metadata:\n")[1].split("\n\n")[0].splitlines()
    assert sorted(metadata) == ["  format: pt", "  origin: test"]
    assert "1 tensor in f64" in out and "'rope.inv_freq'" in out


def test_inspect_json_sharded(files):
    doc = json.loads(run_cli("inspect", files["sharded"], "--json").stdout)
    assert doc["schema"] == "gemma_stream.inspect/1" and doc["format"] == "safetensors"
    assert doc["path"].endswith("model.safetensors.index.json")
    assert set(doc) == {"schema", "path", "format", "files", "filter", "total_tensors", "tensors", "totals",
                        "metadata", "extras", "warnings"}
    assert [os.path.basename(f["path"]) for f in doc["files"]] == ["model-00001-of-00002.safetensors",
                                                                   "model-00002-of-00002.safetensors"]
    assert all(f["bytes"] == os.path.getsize(f["path"]) for f in doc["files"])
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert set(by_name) == {"a.weight", "step", "b.weight"}
    for t in doc["tensors"]:
        assert set(t) == {"name", "dtype", "shape", "nbytes", "file", "offset", "strides", "storage"}
    b = by_name["b.weight"]
    assert (b["dtype"], b["shape"], b["nbytes"], os.path.basename(b["file"])) == (
        "f16", [5, 4], 40, "model-00002-of-00002.safetensors")
    from safetensors import safe_open
    with safe_open(b["file"], "pt") as f:
        assert _bytes_at(b["file"], b["offset"], 40) == f.get_tensor("b.weight").view(torch.uint8).numpy().tobytes()
    assert doc["totals"]["tensors"] == 3 and doc["totals"]["params"] == 120 + 3 + 20
    assert doc["totals"]["by_dtype"] == {"f32": {"tensors": 1, "params": 120, "nbytes": 480},
                                         "i64": {"tensors": 1, "params": 3, "nbytes": 24},
                                         "f16": {"tensors": 1, "params": 20, "nbytes": 40}}
    assert doc["metadata"] == {"total_size": "0"} and doc["warnings"] == []


def test_inspect_torchzip_extras_warnings_and_filter(files, capsys):
    out = run_cli("inspect", files["ckpt"]).stdout
    assert "format      torchzip" in out
    assert "non-tensor entries:\n  epoch: 3" in out
    warnings = out.split("warnings:\n")[1]
    assert "1 non-contiguous view" in warnings and "'proj.weight'" in warnings and "strides [1, 8]" in warnings
    assert "3 tensors share storage" in warnings  # embedder, lm_head and the row slice
    assert "1 tensor in c64" in warnings and "'freqs_cis'" in warnings
    doc = json.loads(call_cli(capsys, "inspect", files["ckpt"], "--json", "--filter", r"^(rows|proj)").stdout)
    assert doc["filter"] == "^(rows|proj)" and doc["total_tensors"] == 5
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert set(by_name) == {"rows", "proj.weight"} and doc["totals"]["tensors"] == 2
    assert by_name["proj.weight"]["strides"] == [1, 8] and by_name["rows"]["strides"] is None
    reference = torch.load(files["ckpt"], weights_only=True)["model_state_dict"]["rows"]
    assert _bytes_at(files["ckpt"], by_name["rows"]["offset"], 4 * 8 * 4) == reference.numpy().tobytes()


def test_inspect_does_not_import_the_benchmark_harness(files):
    code = ("import sys; from gemma_stream.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "assert 'gemma_stream.benchmark' not in sys.modules, 'imported'; sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    proc = subprocess.run([sys.executable, "-c", code, str(files["single"])], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("name, fragment", [
    ("truncated", "end beyond the data buffer"),
    ("bad_header", "header is not valid UTF-8 JSON"),
    ("truncated_ckpt", "truncated or damaged zip archive"),
])
def test_bad_file_is_one_error_line(files, name, fragment, capsys):
    assert_one_error_line(call_cli(capsys, "inspect", files[name]), str(files[name]), fragment)


def test_bad_arguments_are_one_error_line(files, tmp_path, capsys):
    assert_one_error_line(run_cli("inspect", files["single"], "--filter", "(", check_rc=None),
                          "--filter", "bad regular expression")
    assert_one_error_line(call_cli(capsys, "inspekt", files["single"]), "invalid choice: 'inspekt'")
    assert_one_error_line(call_cli(capsys), "required: COMMAND")
    assert_one_error_line(call_cli(capsys, "convert", files["single"], tmp_path / "out", "--max-shard-size", "2XB"),
                          "max_shard_size '2XB' is not a size")
    assert not (tmp_path / "out").exists()
    assert_one_error_line(call_cli(capsys, "verify", tmp_path / "nothing.safetensors"),
                          "nothing.safetensors: no such file or directory")


def test_debug_shows_the_traceback_and_verbose_logs(files, capsys):
    proc = run_cli("--debug", "inspect", files["bad_header"], check_rc=2)
    assert "Traceback" in proc.stderr and proc.stderr.splitlines()[-1].startswith("gemma-stream: error: ")
    try:
        proc = call_cli(capsys, "inspect", files["single"], "-v", "--json")
    finally:
        cli._configure_logging(0)  # drop the handler bound to capsys's stream
    assert "gemma-stream: INFO: gemma_stream.cli: read 4 tensor records" in proc.stderr
    assert json.loads(proc.stdout)["totals"]["tensors"] == 4


def test_version_names_the_backend_and_why(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:  # argparse's exit
        cli.main(["--version"])
    assert exit_info.value.code == 0
    version, backend = capsys.readouterr().out.splitlines()
    assert version == f"gemma-stream {gemma_stream.__version__}"
    if gemma_stream.native_available():
        assert backend == "backend: native (C++ extension gemma_stream._native)"
    else:
        assert backend.startswith("backend: python, the slower fallback (gemma_stream._native did not import: ")
    monkeypatch.setenv("GEMMA_STREAM_BACKEND", "python")
    assert cli.backend_line() == "backend: python (GEMMA_STREAM_BACKEND=python)"


def test_version_without_the_extension_says_why(tmp_path):
    """A copy of the package without _native*.so: the fallback is named, with the reason."""
    import shutil
    copy = tmp_path / "gemma_stream"
    shutil.copytree(Path(gemma_stream.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("_native*", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("GEMMA_STREAM_BACKEND", None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "gemma_stream", "--version"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == (f"backend: python, the slower fallback (gemma_stream._native did not import:"
                                           f" no _native extension module in {copy}: not built)")


# ---------------------------------------------------------------- verify

def test_verify_checksum(files):
    proc = run_cli("verify", files["sharded"], "--checksum", cwd=files["sharded"].parent)
    lines = proc.stdout.splitlines()
    names = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for line, name in zip(lines, names):
        digest, path = line.split("  ")
        assert path == f"sharded/{name}"
        assert digest == hashlib.sha256((files["sharded"] / name).read_bytes()).hexdigest()
    assert lines[3].startswith("OK: sharded/model.safetensors.index.json: safetensors, 2 files, 3 tensors")
    assert len(lines) == 4


@pytest.mark.parametrize("name", ["truncated", "bad_header", "truncated_ckpt"])
def test_verify_invalid_file_verdict(files, name, capsys):
    proc = call_cli(capsys, "verify", files[name])
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and proc.stdout.startswith(f"FAILED: {files[name]}: ")
    assert proc.stderr == ""


def test_verify_ckpt_against_its_safetensors_conversion(files):
    proc = run_cli("verify", files["ckpt_real"], "--against", files["ckpt_as_safetensors"], "--json")
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "gemma_stream.verify/1" and doc["ok"] is True and doc["error"] is None
    assert [c["format"] for c in doc["checkpoints"]] == ["torchzip", "safetensors"]
    comparison = doc["comparison"]
    assert comparison["counts"] == {"equal": 4}
    assert {t["name"] for t in comparison["tensors"]} == {"embedder.weight", "lm_head.weight", "proj.weight", "rows"}
    assert doc["verdict"].startswith("OK: ") and "4 tensors: 4 equal" in doc["verdict"]


def test_verify_reports_differences(files):
    proc = run_cli("verify", files["ref"], "--against", files["changed"], check_rc=1)
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:-1]}
    assert "differs" in rows["l.weight"] and "0.5" in rows["l.weight"].split()
    assert "shape mismatch" in rows["emb.weight"] and "[40, 64] vs [20, 64]" in rows["emb.weight"]
    assert "only in A" in rows["n.weight"] and "only in B" in rows["extra"]
    assert proc.stdout.splitlines()[-1].startswith("FAILED: ") and "4 of 4 tensors disagree" in proc.stdout


def test_verify_dequantizes_int8_and_int4(files, capsys):
    doc = json.loads(run_cli("verify", files["ref"], "--against", files["quant"], "--json").stdout)
    tensors = {t["name"]: t for t in doc["comparison"]["tensors"]}
    assert set(tensors) == {"l.weight", "emb.weight", "n.weight"}  # scales are consumed, not "only in B"
    assert tensors["l.weight"]["b"] == "int8*f32" and tensors["emb.weight"]["b"] == "int4/g32*bf16"
    assert tensors["n.weight"]["status"] == "equal"
    from safetensors.torch import load_file
    ref = load_file(files["ref"])
    q8, s8 = quantize_int8(ref["l.weight"])
    deq8 = q8.float() * s8[:, None]
    expected_sqnr = 20 * math.log10(ref["l.weight"].norm() / (ref["l.weight"] - deq8).norm())
    assert tensors["l.weight"]["status"] == "dequantized"
    assert tensors["l.weight"]["sqnr_db"] == pytest.approx(expected_sqnr, abs=1e-3)
    assert tensors["l.weight"]["max_abs_err"] == pytest.approx(float((ref["l.weight"] - deq8).abs().max()), rel=1e-6)
    assert 18 < tensors["emb.weight"]["sqnr_db"] < 26 and doc["ok"] is True
    proc = call_cli(capsys, "verify", files["ref"], "--against", files["quant"], "--min-sqnr", "30")
    assert proc.returncode == 1
    assert "low SQNR" in proc.stdout and "first: 'emb.weight' low SQNR" in proc.stdout


def test_verify_cast_to_bf16_is_equal_as_bf16(files):
    proc = run_cli("verify", files["ref_bf16"], "--against", files["ref"])
    assert "3 tensors: 3 equal as bf16" in proc.stdout.splitlines()[-1]


def test_progress_bar_on_a_terminal_and_quiet(files):
    def stderr_of(*extra):
        leader, follower = pty.openpty()
        # a fresh pty is 0 columns wide, and tqdm would draw an empty bar
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
        proc = subprocess.Popen([sys.executable, "-m", "gemma_stream", "verify", str(files["single"]),
                                 "--checksum", *extra], env=env, stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert proc.wait(timeout=120) == 0
        return b"".join(chunks).decode()
    bar = stderr_of()
    assert "sha256" in bar and "B/s" in bar
    assert stderr_of("--quiet") == ""


# ---------------------------------------------------------------- streaming comparison, in process

def test_compare_streams_in_bounded_batches(files, monkeypatch):
    calls = []
    real = verify.load_state_dict

    def recording(path, *, keys, **kwargs):
        result = real(path, keys=keys, **kwargs)
        calls.append(sum(t.nbytes for t in result.values()))
        return result
    monkeypatch.setattr(verify, "load_state_dict", recording)
    monkeypatch.setattr(verify, "CHUNK_ELEMENTS", 100)  # many row chunks per tensor
    small = verify.compare_checkpoints(files["ref"], files["quant"], batch_bytes=1)
    assert len(calls) == 2 * 3 and max(calls) <= 64 * 128 * 4  # one tensor pair per batch
    calls.clear()
    whole = verify.compare_checkpoints(files["ref"], files["quant"])
    assert len(calls) == 2
    assert [(t.name, t.status) for t in small.tensors] == [(t.name, t.status) for t in whole.tensors]
    for chunked, at_once in zip(small.tensors, whole.tensors):
        assert chunked.max_abs_err == at_once.max_abs_err
        assert chunked.sqnr_db == pytest.approx(at_once.sqnr_db, abs=1e-6)


def test_dequantize_rows_matches_the_formulas(files):
    from safetensors.torch import load_file
    ref, quant = load_file(files["ref"]), load_file(files["quant"])
    pairs = {name: (oa, ob) for name, oa, ob in verify.pair_operands(
        gemma_stream.formats.open_checkpoint(files["ref"]), gemma_stream.formats.open_checkpoint(files["quant"]))}
    _, op4 = pairs["emb.weight"]
    q4, s4, z4 = quant["emb.weight"], quant["emb.weight_scale"], quant["emb.weight_zero"]
    nibbles = torch.empty(40, 64, dtype=torch.uint8)
    nibbles[:, 0::2], nibbles[:, 1::2] = q4 & 15, q4 >> 4
    expected = (nibbles.float() - 8) * s4.float().repeat_interleave(32, dim=1) + z4.float().repeat_interleave(32, dim=1)
    assert torch.equal(verify.dequantize_rows(op4, quant, 3, 17), expected[3:17])
    sqnr = 20 * math.log10(ref["emb.weight"].norm() / (ref["emb.weight"] - expected).norm())
    assert 18 < sqnr < 26  # FORMATS.md: about 22 dB for G = 32 on Gaussian weights


# ---------------------------------------------------------------- convert

def test_convert_sharded_bf16_then_verify(files, tmp_path, capsys):
    pytest.importorskip("gemma_stream.convert")
    out = tmp_path / "converted"
    proc = run_cli("convert", files["ckpt_real"], out, "--dtype", "bf16", "--max-shard-size", "300B")
    assert proc.stdout.startswith(f"wrote {out / 'model.safetensors.index.json'}: ")
    assert "tied name written once: lm_head.weight -> embedder.weight" in proc.stdout
    from safetensors.torch import load_file
    reference = torch.load(files["ckpt_real"], weights_only=True)["model_state_dict"]
    shards = sorted(out.glob("model-*.safetensors"))
    written = {k: v for shard in shards for k, v in load_file(shard).items()}
    assert len(shards) > 1 and set(written) == set(reference) - {"lm_head.weight"}
    for name, tensor in written.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    proc = call_cli(capsys, "verify", files["ckpt_real"], "--against", out)
    assert proc.returncode == 0, proc.stdout
    assert ": 4 tensors: 3 equal as bf16, 1 tied (lowest SQNR " in proc.stdout.splitlines()[-1]
    proc = call_cli(capsys, "verify", files["ckpt_real"], "--against", out, "--ignore", "^(rows|proj)", "--json")
    assert json.loads(proc.stdout)["comparison"]["counts"] == {"equal as bf16": 1, "tied": 1}


def test_convert_quantized_output_verifies(files, tmp_path, capsys):
    pytest.importorskip("gemma_stream.convert")
    out = tmp_path / "int8.safetensors"
    proc = call_cli(capsys, "convert", files["ref"], out, "--quantize", "int8")
    assert proc.returncode == 0 and "2 tensors stored as int8" in proc.stdout
    proc = call_cli(capsys, "verify", files["quant"], "--against", out, "--json")
    doc = json.loads(proc.stdout)
    # l.weight and its scaler: the same int8 bits; emb.weight: int4 (quant) vs int8 (out), both dequantized
    assert proc.returncode == 0 and doc["comparison"]["counts"] == {"equal": 3, "dequantized": 1}


# ---------------------------------------------------------------- bench, demo (the harness's own tests cover its rows)

def _harness_or_skip():
    try:
        from gemma_stream import benchmark
    except ImportError as e:
        pytest.skip(f"benchmark harness unavailable: {e}")
    return benchmark


def test_bench_plot_writes_a_png(tmp_path):
    _harness_or_skip()
    pytest.importorskip("matplotlib")
    loader = "gs_native" if gemma_stream.native_available() else "gs_python"
    png, report = tmp_path / "bench.png", tmp_path / "bench.json"
    proc = run_cli("bench", "--synthetic", "tiny", "--loaders", loader, "--workdir", tmp_path / "work",
                   "--plot", png, "--json", report)
    assert "gemma_stream load_into" in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    import matplotlib.image
    assert matplotlib.image.imread(png).shape[:2] == (height, width)
    json.loads(report.read_text())


def test_demo_tiny(tmp_path, capsys):
    _harness_or_skip()
    proc = call_cli(capsys, "demo", "--size", "tiny", "--workdir", tmp_path)  # its loaders run in subprocesses
    assert proc.returncode == 0, proc.stderr
    assert "torch.load + load_state_dict" in proc.stdout
    verdict = next(line for line in proc.stdout.splitlines() if line.startswith("gemma_stream: "))
    assert " than torch.load + load_state_dict (median of 3 loads each)" in verdict
    assert "memory not compared" in verdict and "0.00" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the checkpoint is removed


def test_compare_non_finite_values_and_signed_zeros(tmp_path):
    values = torch.tensor([[1.0, float("nan"), float("inf")], [0.0, -2.0, 3.0]])
    moved = values.clone()
    moved[0, 1], moved[1, 0] = 5.0, float("nan")  # the NaN moved: two positions disagree
    zeros = values.clone()
    zeros[1, 0] = -0.0
    save_file({"w": values, "v": values.clone()}, tmp_path / "a.safetensors")
    save_file({"w": moved.bfloat16(), "v": zeros}, tmp_path / "b.safetensors")
    result = {t.name: t for t in verify.compare_checkpoints(tmp_path / "a.safetensors",
                                                            tmp_path / "b.safetensors").tensors}
    w, v = result["w"], result["v"]
    assert (w.status, w.ok, w.nonfinite_mismatches) == ("differs", False, 2)
    assert w.max_abs_err == 0.0  # finite positions: 1, inf==inf skipped, -2, 3 all agree in bf16
    assert (v.status, v.ok, v.max_abs_err, v.sqnr_db) == ("differs", False, 0.0, None)
    assert "signed zeros" in v.note
    relaxed = {t.name: t for t in verify.compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                                                             min_sqnr_db=40).tensors}
    assert relaxed["v"].status == "close" and relaxed["v"].ok and not relaxed["w"].ok
