"""What the mix matrix prints: seconds and ratios per cell as text, and the README's table in markdown.

Pure functions of the ``bench_mixes --json`` document (``matrix.run_matrix`` writes it), so a table
can be printed again, or changed, without loading anything.
"""

from __future__ import annotations

from ..cli_text import human_bytes

__all__ = ["format_cells", "render_markdown"]


def _fmt_spread(s: dict, fmt: str = ".2f") -> str:
    if not s or s["median"] is None:
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def format_cells(cells: list[dict]) -> str:
    """Seconds per entry and the ratios, one block per cell: median (min-max) over the rounds."""
    out = []
    for cell in cells:
        out.append(f"{cell['mix']} {cell['size']} ({cell['tensors']} tensors, {human_bytes(cell['data_bytes'])}), "
                   f"{cell['state']}:")
        for key, e in cell["entries"].items():
            if e["status"] != "ok":
                out.append(f"  {key:<34} {e['status']}: {e['skipped'] or (e['errors'] or [''])[-1]}")
                continue
            out.append(f"  {key:<34} {_fmt_spread(e['seconds'], '.3f'):>24} s  {e['gb_per_s']:6.2f} GB/s  "
                       f"peak {human_bytes(e['peak_bytes'])}" + (f"  ({len(e['errors'])} failed)" if e["errors"] else ""))
        for name, r in cell["ratios"].items():
            target = f"  (target >= {r['target']:g})" if r["target"] is not None else ""
            out.append(f"  {name:<62} {_fmt_spread(r)}{target}")
        if not cell["checks_agree"]:
            out.append("  WARNING: loaders disagree about the weights")
    out.append("s: median (min-max) over the rounds, each load in a fresh process; ratio = the reference's s / "
               "the entry's s in the same round (above 1: the entry was faster).")
    return "\n".join(out)


#: README columns: (header, ratio name, state)
_README_COLUMNS = [
    ("cold copy, of bound", "copy, of the 2-thread bound (safetensors)", "cold"),
    ("warm copy, of bound", "copy, of the 2-thread bound (safetensors)", "warm"),
    ("warm copy vs safetensors", "copy vs safetensors load_model", "warm"),
    ("cold mmap vs torch.load(mmap)", "mmap read-ahead on vs torch.load(mmap)+assign", "cold"),
    ("cold read-ahead on vs off", "mmap read-ahead on vs off", "cold"),
    ("zip vs safetensors, cold", "copy, zip vs safetensors (GB/s)", "cold"),
    ("zip vs safetensors, warm", "copy, zip vs safetensors (GB/s)", "warm"),
]


def render_markdown(doc: dict) -> str:
    """The README's benchmark table from a ``bench_mixes --json`` document: one row per mix and size."""
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for cell in doc["cells"]:
        by_key.setdefault((cell["mix"], cell["size"]), {})[cell["state"]] = cell
    header = ["mix", "size", "tensors", *(c[0] for c in _README_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(_README_COLUMNS)) + "|"]
    for (mix, size), states in by_key.items():
        any_cell = next(iter(states.values()))
        cells = [mix, size, str(any_cell["tensors"])]
        for _, ratio, state in _README_COLUMNS:
            r = states.get(state, {}).get("ratios", {}).get(ratio)
            cells.append(_fmt_spread(r) if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    rounds = doc.get("rounds")
    lines.append("")
    lines.append(f"Ratios: the reference's seconds / gemma_stream's in the same round (above 1: gemma_stream "
                 f"faster; 'of bound': 1.00 = the 2-thread pread bound), median (min-max) of {rounds} rounds. "
                 f"Command: `{' '.join(doc.get('command', []))}`.")
    return "\n".join(lines)
