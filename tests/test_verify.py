"""verify: validating a checkpoint and comparing two, through ``gemma-stream verify`` and the module.

Figures are checked against the files and the reference quantizers, not against our own readers.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream
from gemma_stream import verify
from gemma_stream.quant import quantize_int8

from conftest import call_cli, run_cli


# ---------------------------------------------------------------- the verify command

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


# ---------------------------------------------------------------- streaming comparison, in process

def test_compare_streams_in_bounded_batches(files, monkeypatch):
    calls = []
    real = verify.compare.load_state_dict

    def recording(path, *, keys, **kwargs):
        result = real(path, keys=keys, **kwargs)
        calls.append(sum(t.nbytes for t in result.values()))
        return result
    monkeypatch.setattr(verify.compare, "load_state_dict", recording)
    monkeypatch.setattr(verify.judge, "CHUNK_ELEMENTS", 100)  # many row chunks per tensor
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
