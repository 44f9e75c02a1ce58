"""The C++ test driver's expected bytes and the extension's type stub stay true."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
from pathlib import Path

import pytest

import gemma_stream as gs

NATIVE_TESTS = Path(__file__).parent / "native"


def test_driver_expected_bytes_match_the_torch_reference():
    # tests/native/expected.h is generated from torch and gemma_stream.quant; regenerate it when
    # the reference quantizers or torch's conversions change (the driver then checks the new bytes).
    spec = importlib.util.spec_from_file_location("make_expected", NATIVE_TESTS / "make_expected.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    assert out.getvalue() == (NATIVE_TESTS / "expected.h").read_text(), \
        "run: python tests/native/make_expected.py > tests/native/expected.h"


@pytest.mark.skipif(not gs.native_available(), reason="needs the native extension")
def test_native_stub_names_what_the_extension_defines():
    from gemma_stream import _native
    stub = ast.parse((Path(gs.__file__).parent / "_native.pyi").read_text())
    stubbed = {node.name for node in stub.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    stubbed |= {node.target.id for node in stub.body if isinstance(node, ast.AnnAssign)}   # OPS, PAGE_BYTES, ...
    defined = {name for name in dir(_native) if not name.startswith("_")}
    assert stubbed == defined
