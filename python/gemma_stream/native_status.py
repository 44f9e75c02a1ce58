"""Why the compiled engine did not import, in words a user can act on.

A bare ``ImportError`` for a missing extension reads "cannot import name
'_native' from partially initialized module 'gemma_stream' (most likely due to
a circular import)", which blames the wrong thing. This looks at what the
package directory holds instead.
"""

from __future__ import annotations

import importlib.machinery
import os

__all__ = ["native_import_problem"]


def native_import_problem(error: BaseException | None) -> str:
    """One sentence on why ``gemma_stream._native`` is unavailable (``error``: the ImportError seen).

    Example::

        try:
            from gemma_stream import _native
        except ImportError as e:
            print(native_import_problem(e))
    """
    package_dir = os.path.dirname(os.path.abspath(__file__))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    try:
        names = sorted(os.listdir(package_dir))
    except OSError:
        names = []
    here = [n for n in names if any(n == "_native" + s for s in suffixes)]
    built = [n for n in names if n.startswith("_native.") and n.endswith((".so", ".pyd"))]
    if not here and not built:
        return ("this install has no compiled extension (gemma_stream/_native*): it was built without a "
                "working C++ compiler, or with GEMMA_STREAM_NATIVE=off; install a C++17 compiler and "
                "reinstall gemma_stream for the native engine")
    if not here:
        return (f"the compiled extension was built for another Python ({', '.join(built)}; this one loads "
                f"{', '.join(suffixes)}); reinstall gemma_stream with this interpreter")
    return f"{here[0]} is installed but did not import: {error}"
