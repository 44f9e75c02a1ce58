"""The ``gemma-stream`` command (also ``python -m gemma_stream``).

    $ gemma-stream inspect model.safetensors --filter 'layers\\.0\\.'
    $ gemma-stream verify model.ckpt --against model.safetensors --checksum
    $ gemma-stream convert model.ckpt out/ --dtype bf16 --max-shard-size 2GB

Exit status: 0 success; 1 ``verify`` found an invalid checkpoint or a difference;
2 a wrong argument or a bad input file (one line on stderr, a traceback only
with ``--debug``); 3 an internal error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings

from . import __version__
from .cli_text import (_bar, _checkpoint_summary, _comparison_verdict, _count, _display_path, format_comparison,
                       format_inspect, human_bytes, inspect_report)
from .errors import GemmaStreamError
from .formats import open_checkpoint, resolve_path

__all__ = ["main", "build_parser", "inspect_report", "format_inspect"]

PROG = "gemma-stream"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
MIB = 1 << 20
log = logging.getLogger("gemma_stream.cli")


class UsageError(Exception):
    """A wrong argument or an unavailable command: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage too; we keep one line
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- parser

def _regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"bad regular expression {text!r}: {e}") from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the command; the command's copy must not reset them."""
    def default(value):
        return argparse.SUPPRESS if suppress else value
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no progress bars")
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="log to stderr through logger 'gemma_stream' (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks on errors")


def _harness():
    """The benchmark module, imported only for ``bench`` and ``demo``: ``inspect`` must stay fast."""
    try:
        from . import benchmark
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.benchmark":
            raise UsageError("the benchmark harness (gemma_stream.benchmark) is not part of this install") from None
        raise UsageError(f"this command needs the {e.name!r} package: pip install 'gemma_stream[bench]'") from None
    return benchmark


def backend_line() -> str:
    """Which executor ``backend="auto"`` runs in this process, and why when it is the Python fallback."""
    from . import executors
    from .config import config
    try:
        forced = config().backend
    except ValueError as e:   # a bad GEMMA_STREAM_BACKEND: say so here rather than fail --version
        return f"backend: unknown ({e})"
    if forced == "python":
        return "backend: python (GEMMA_STREAM_BACKEND=python)"
    if executors.native_available():
        return "backend: native (C++ extension gemma_stream._native)"
    import importlib.util
    if importlib.util.find_spec(f"{__package__}._native") is None:
        reason = f"no _native extension module in {os.path.dirname(os.path.abspath(__file__))}: not built"
    else:   # it is there but failed to load (a missing symbol, another Python's build)
        reason = str(getattr(executors, "_NATIVE_ERROR", None) or "import failed")
    if forced == "native":
        return f"backend: none: GEMMA_STREAM_BACKEND=native, but gemma_stream._native did not import ({reason})"
    return f"backend: python, the slower fallback (gemma_stream._native did not import: {reason})"


class _Version(argparse.Action):
    """``--version``: the version and the active backend on two lines (argparse's own action rewraps text)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show the version and the active backend, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {__version__}\n{backend_line()}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` names the subcommand whose lazily imported options to add."""
    parser = _Parser(prog=PROG, description="Inspect, verify, convert and benchmark PyTorch checkpoints "
                     "(safetensors, sharded, torch zip .ckpt/.pt/.bin).",
                     epilog="exit status: 0 ok, 1 verify found a problem, 2 bad argument or bad file, "
                     "3 internal error")
    parser.add_argument("--version", action=_Version)
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="list the tensors, metadata and warnings of a checkpoint")
    p.add_argument("path", help="a .safetensors, .ckpt/.pt/.bin, *.index.json or a directory")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--filter", type=_regex, metavar="REGEX", help="only tensors whose name matches (re.search)")
    p.add_argument("--state-dict-key", "--key", dest="state_dict_key",
                   help="state dict inside a torch zip (default: found automatically)")
    _add_common(p, suppress=True)

    p = sub.add_parser("verify", help="validate headers and byte ranges; compare with another checkpoint")
    p.add_argument("path")
    p.add_argument("--against", metavar="OTHER", help="compare every tensor with this checkpoint")
    p.add_argument("--checksum", action="store_true", help="print a SHA-256 per file (sha256sum format)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--min-sqnr", type=float, metavar="DB",
                   help="accept values that differ if their SQNR is at least DB (default: dequantized "
                        "tensors pass with their figures reported, other differences fail)")
    p.add_argument("--ignore", type=_regex, metavar="REGEX",
                   help="leave tensors whose name matches out of --against (e.g. 'freqs_cis', which convert drops)")
    p.add_argument("--batch-mb", type=_positive_int, default=256, metavar="MB",
                   help="tensor bytes held per comparison batch, both sides together (default 256)")
    p.add_argument("--state-dict-key", "--key", dest="state_dict_key",
                   help="state dict inside a torch zip (both sides)")
    p.add_argument("--backend", choices=("auto", "native", "python"), default="auto")
    _add_common(p, suppress=True)

    p = sub.add_parser("convert", help="stream a checkpoint into safetensors (optionally cast or quantize)")
    p.add_argument("src")
    p.add_argument("dst", help="a .safetensors file, or a directory for a sharded set")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"), help="cast floating-point tensors")
    p.add_argument("--quantize", choices=("int8", "int4"), help="quantize 2-D weights (FORMATS.md layouts)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=128, help="int4 group size")
    p.add_argument("--max-shard-size", metavar="SIZE",
                   help="write a directory of shards of at most SIZE (2GB = 10^9 bytes, 2GiB = 2^30) and an index")
    p.add_argument("--state-dict-key", "--key", dest="state_dict_key",
                   help="state dict inside a torch zip")
    p.add_argument("--backend", choices=("auto", "native", "python"), default="auto")
    _add_common(p, suppress=True)

    for name, what in (("bench", "time loaders, each in its own subprocess"),
                       ("demo", "write a Gemma-shaped checkpoint and load it two ways")):
        p = sub.add_parser(name, help=what)
        if command == name:
            add_arguments = getattr(_harness(), f"add_{name}_arguments", None)
            if add_arguments is None:
                raise UsageError(f"the benchmark harness in this install has no add_{name}_arguments()")
            add_arguments(p)
        _add_common(p, suppress=True)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv: global options take no values, so it is the first non-option."""
    return next((a for a in argv if not a.startswith("-")), None)


# ---------------------------------------------------------------- inspect

def cmd_inspect(args) -> int:
    start = time.perf_counter()
    ckpt = open_checkpoint(args.path, key=args.state_dict_key)
    log.info("read %d tensor records from %d files in %.3f s", len(ckpt.records), len(ckpt.files),
             time.perf_counter() - start)
    report = inspect_report(args.path, ckpt, args.filter)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return EXIT_OK


# ---------------------------------------------------------------- verify

def cmd_verify(args) -> int:
    from .errors import CheckpointError
    for path in [args.path] + ([args.against] if args.against else []):
        resolve_path(path)  # a path that names no checkpoint is a wrong argument (exit 2), not a verdict
    document = {"schema": "gemma_stream.verify/1", "ok": False, "verdict": "", "error": None,
                "checkpoints": [], "comparison": None}
    lines: list[str] = []
    try:
        _run_verify(args, document, lines)
    except CheckpointError as e:  # a header, a range or a read failed: that is the verdict
        document["ok"], document["error"], document["verdict"] = False, str(e), f"FAILED: {e}"
    return _finish_verify(args, document, lines)


def _run_verify(args, document: dict, lines: list[str]) -> None:
    from . import verify
    checkpoints = []
    for path in [args.path] + ([args.against] if args.against else []):
        ckpt = open_checkpoint(path, key=args.state_dict_key)
        verify.check_ranges(ckpt)
        checkpoints.append(ckpt)
        files = [{"path": f, "bytes": os.path.getsize(f), "sha256": None} for f in verify.checkpoint_files(path, ckpt)]
        document["checkpoints"].append({"path": resolve_path(path), "format": ckpt.format, "files": files,
                                        "tensors": len(ckpt.records)})
    if args.checksum:
        for entry in document["checkpoints"]:
            with _bar(args, sum(f["bytes"] for f in entry["files"]), "sha256") as bar:
                for f in entry["files"]:
                    f["sha256"] = verify.sha256_file(f["path"], on_bytes=bar.update)
                    lines.append(f"{f['sha256']}  {_display_path(f['path'])}")
    if not args.against:
        document["ok"] = True
        document["verdict"] = (f"OK: {_display_path(resolve_path(args.path))}: "
                               f"{_checkpoint_summary(checkpoints[0])}: every header and byte range is valid")
        return
    total = sum(r.nbytes for ckpt in checkpoints for r in ckpt.records)
    with _bar(args, total, "compare") as bar:
        comparison = verify.compare_checkpoints(args.path, args.against, state_dict_key=args.state_dict_key,
                                                min_sqnr_db=args.min_sqnr,
                                                batch_bytes=args.batch_mb * MIB, backend=args.backend,
                                                on_bytes=bar.update, checkpoints=tuple(checkpoints),
                                                ignore=args.ignore)
    document["ok"] = comparison.ok
    document["verdict"] = _comparison_verdict(comparison)
    document["comparison"] = {"a": resolve_path(args.path), "b": resolve_path(args.against),
                              "min_sqnr_db": args.min_sqnr, "ignore": args.ignore and args.ignore.pattern,
                              "counts": dict(comparison.counts()),
                              "tensors": [dataclasses.asdict(t) for t in comparison.tensors]}
    lines += format_comparison(comparison)


def _finish_verify(args, document: dict, lines: list[str]) -> int:
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(lines + [document["verdict"]]))
    return EXIT_OK if document["ok"] else EXIT_FAILED


# ---------------------------------------------------------------- convert, bench, demo

def cmd_convert(args) -> int:
    try:
        from .conversion import convert
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.convert":
            raise
        raise UsageError("convert is not part of this install (gemma_stream.conversion is missing)") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size,
                         max_shard_size=args.max_shard_size, state_dict_key=args.state_dict_key, backend=args.backend,
                         progress=args.progress)
    for warning in caught:
        print(f"{PROG}: warning: {' '.join(str(warning.message).split())}", file=sys.stderr)
    rate = report.bytes_read / report.seconds / 1e9 if report.seconds > 0 else 0.0
    print(f"wrote {_display_path(report.index or report.files[0])}: {_count(len(report.files), 'file')}, "
          f"{_count(report.tensors, 'tensor')}, {human_bytes(report.bytes_written)} in {report.seconds:.2f} s "
          f"({rate:.2f} GB/s read, {report.backend} backend)")
    if report.quantized:
        print(f"  {_count(len(report.quantized), 'tensor')} stored as {args.quantize}")
    if report.unquantized:
        print(f"  {_count(len(report.unquantized), '2-D weight')} kept in float: {'; '.join(report.unquantized[:3])}"
              + (" ..." if len(report.unquantized) > 3 else ""))
    if report.aliases:
        print(f"  {_count(len(report.aliases), 'tied name')} written once: "
              + ", ".join(f"{alias} -> {name}" for alias, name in list(report.aliases.items())[:4]))
    return EXIT_OK


def cmd_bench(args) -> int:
    return int(_harness().run_bench(args))


def cmd_demo(args) -> int:
    return int(_harness().run_demo(args))


COMMANDS = {"inspect": cmd_inspect, "verify": cmd_verify, "convert": cmd_convert, "bench": cmd_bench,
            "demo": cmd_demo}


# ---------------------------------------------------------------- entry point

def _configure_logging(verbosity: int) -> None:
    """Logger ``gemma_stream`` is silent unless -v; repeated calls (tests) replace our handler."""
    logger = logging.getLogger("gemma_stream")
    for handler in [h for h in logger.handlers if getattr(h, "gemma_stream_cli", False)]:
        logger.removeHandler(handler)
    handler: logging.Handler = logging.NullHandler()
    if verbosity:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
        logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    handler.gemma_stream_cli = True
    logger.addHandler(handler)


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser(_command_of(argv)).parse_args(argv)
        _configure_logging(args.verbose)
        args.progress = not args.quiet and sys.stderr.isatty()
        return COMMANDS[args.command](args)
    except UsageError as e:
        _error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # the harness refuses bad options with SystemExit("bench: ..."); --help exits 0
        if not isinstance(e.code, str):
            raise
        _error(e.code)
        return EXIT_USAGE
    except BrokenPipeError:  # `gemma-stream inspect ... | head`: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except (GemmaStreamError, OSError) as e:  # bad input; a stray ValueError is a bug of ours (exit 3)
        if debug:
            traceback.print_exc()
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        _error(message)
        return EXIT_USAGE
    except Exception as e:  # a bug: still one line, unless --debug
        if debug:
            traceback.print_exc()
        _error(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        return EXIT_INTERNAL
