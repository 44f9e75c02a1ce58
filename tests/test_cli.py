"""The gemma-stream command, run as a subprocess on small generated checkpoints.

Outputs are checked against the files themselves (bytes at the reported offsets), not against our
own readers. The checkpoints and the runners are shared with test_verify.py through conftest.py.
"""

from __future__ import annotations

import json
import re
import os
import fcntl
import pty
import struct
import subprocess
import termios
import sys

import pytest
import torch

import gemma_stream
from gemma_stream import cli

from conftest import PACKAGE_ROOT, bytes_at, call_cli, package_without_native, run_cli


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-stream: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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
    assert bytes_at(files["single"], int(offset), 64 * 32 * 2) == expected.view(torch.uint8).numpy().tobytes()
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
        assert bytes_at(b["file"], b["offset"], 40) == f.get_tensor("b.weight").view(torch.uint8).numpy().tobytes()
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
    assert bytes_at(files["ckpt"], by_name["rows"]["offset"], 4 * 8 * 4) == reference.numpy().tobytes()


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
    copy = package_without_native(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("GEMMA_STREAM_BACKEND", None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "gemma_stream", "--version"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == (f"backend: python, the slower fallback (gemma_stream._native did not import:"
                                           f" no _native extension module in {copy}: not built)")


# ---------------------------------------------------------------- progress bars

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


# ---------------------------------------------------------------- convert

def test_convert_sharded_bf16_then_verify(files, tmp_path, capsys):
    pytest.importorskip("gemma_stream.conversion")
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
    pytest.importorskip("gemma_stream.conversion")
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
    # on a 5.6 MiB model the two loaders can land within 5% of each other: "as fast as" is a verdict too
    assert re.search(r"^gemma_stream: (\d+\.\dx (faster|slower) than|as fast as) torch\.load \+ load_state_dict"
                     r"( \(within 5%\))? \(median of 3 loads each\)", verdict), verdict
    assert "memory not compared" in verdict and "0.00" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the checkpoint is removed

