"""A seeded, differential mutation fuzzer for the checkpoint readers (issue 14).

Each case is a small valid checkpoint (safetensors, or a torch zip) mutated by
one to three operations chosen from a seeded RNG: safetensors header JSON and
length, zip structure (local headers, central directory, EOCD, ZIP64 records),
or the ``data.pkl`` opcodes (the zip is then rebuilt around the new pickle).
The same file is read by the reference (``safetensors.torch.load_file``, or
``torch.load(weights_only=True)``) and by ``load_state_dict`` on each backend,
and the outcomes are compared:

- both reject; both accept with equal tensors (dtype, shape, bytes; bools by value);
- accepted or rejected only by us (grouped by the reference's or our message);
- wrong data (both accept, tensors differ), leaked exception types (anything but a
  ``GemmaStreamError``), crashes and hangs.

Cases run in child processes under ``RLIMIT_AS`` with a per-case alarm, many per
child; a child that dies or stops answering is blamed on the case it was running,
which is reported as a crash or hang, and a fresh child carries on after it.
Any case can be replayed: its bytes depend only on (seed, format, index).

    python -m gemma_stream.fuzz --cases 2000            # every format, both backends
    python benchmarks/fuzz.py --cases 100000 --formats pickle --json out.json

Modules, one step of the pipeline each: ``builders`` (the valid seed files and the
torch-like zip writer the tests share), ``mutators`` (the mutations and
:func:`make_case`), ``differential`` (one case against the reference:
:func:`run_case`), ``runner`` (child processes: :func:`fuzz`), ``report`` (the
tables and the pickle bombs) and ``cli`` (``main``).
"""

from .cli import main
from .differential import CATEGORIES, run_case
from .mutators import FORMATS, make_case
from .report import BOMBS, bomb_table, format_table, rss_kib
from .runner import fuzz

__all__ = ["FORMATS", "CATEGORIES", "make_case", "run_case", "fuzz", "format_table", "bomb_table", "BOMBS",
           "rss_kib", "main"]
