"""The differential fuzzer: it runs, it classifies, it notices the failures it exists to find.

The few-thousand-case run is in .ci/run (``python benchmarks/fuzz.py --cases 1000``);
here a short run per format and self-tests of the verdicts and of crash handling.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream import fuzz


def test_short_run_of_every_format_finds_no_wrong_data_leak_or_crash():
    results = fuzz.fuzz(60, batch=60, seed=1)
    for fmt in fuzz.FORMATS:
        r = results[fmt]
        assert r["cases"] == 60
        assert r["wrong_data"] == r["leaked"] == r["crash"] == r["hang"] == r["backends_disagree"] == 0, r
        assert r["generator_error"] == 0, r["reasons"]
        assert r["both_reject"] > 0 and r["both_accept_equal"] > 0, (fmt, r)


def test_cases_replay_from_seed_format_and_index():
    for fmt in fuzz.FORMATS:
        assert fuzz.make_case(fmt, 3, 17) == fuzz.make_case(fmt, 3, 17)
        assert fuzz.make_case(fmt, 3, 17) != fuzz.make_case(fmt, 3, 18)


def test_verdicts_name_wrong_data_and_leaked_types(tmp_path, monkeypatch):
    source = tmp_path / "seed.safetensors"
    save_file({"a": torch.arange(4.0)}, str(source))
    data, path = source.read_bytes(), str(tmp_path / "case.safetensors")
    assert fuzz.run_case("safetensors", data, path, ("native", "python")) == \
        {"native": ("both_accept_equal", ""), "python": ("both_accept_equal", "")}
    assert fuzz.run_case("safetensors", b"junk" * 4, path, ("python",))["python"] == ("both_reject", "")
    real = gs.load_state_dict

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        out["a"][0] += 1
        return out
    monkeypatch.setattr(gs, "load_state_dict", wrong)
    assert fuzz.run_case("safetensors", data, path, ("python",))["python"] == ("wrong_data", "a: bytes differ")

    def leak(*args, **kwargs):
        raise KeyError("planted")
    monkeypatch.setattr(gs, "load_state_dict", leak)
    assert fuzz.run_case("safetensors", data, path, ("python",))["python"][0] == "leaked"


def test_a_crashing_child_is_reported_and_the_run_goes_on(monkeypatch):
    monkeypatch.setenv("GEMMA_STREAM_FUZZ_SELFTEST_CRASH", "3")
    r = fuzz.fuzz(6, formats=("safetensors",), backends=("python",), batch=6)["safetensors"]
    assert r["crash"] == 1 and r["examples"]["crash"] == [3]
    assert sum(r[c] for c in fuzz.CATEGORIES) == 6


def test_table_has_one_row_per_format():
    results = {fmt: {"cases": 1, "backends": ["python"], "seconds": 0.1, **{c: 0 for c in fuzz.CATEGORIES}}
               for fmt in fuzz.FORMATS}
    assert len(fuzz.format_table(results).splitlines()) == 2 + len(fuzz.FORMATS)


def test_bomb_table_walks_every_bomb_in_a_child():
    table = fuzz.bomb_table(size=4096).splitlines()
    assert len(table) == 2 + len(fuzz.BOMBS)
    for row, name in zip(table[2:], fuzz.BOMBS):
        assert row.startswith(f"| {name} | ") and row.rstrip(" |").split(" | ")[-1], row
