"""Old names that keep working for a while, each with one DeprecationWarning.

>>> state_dict_key = renamed_argument(state_dict_key, key, old="key", new="state_dict_key", where="gs.inspect")
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import TypeVar

from .errors import UsageError

T = TypeVar("T")


def renamed_argument(new_value: T | None, old_value: T | None, *, old: str, new: str, where: str) -> T | None:
    """The value of a keyword argument that was renamed from ``old`` to ``new``.

    ``key=`` (which state dict inside a torch zip) sat one letter from ``keys=``
    (which tensors to read); it is now ``state_dict_key=``.  Passing the old
    name still works, with a warning; passing both is an error.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise UsageError(f"{where}: pass {new}= only ({old}= is its deprecated name)")
    warnings.warn(f"{where}({old}=...) is deprecated; use {new}=...", DeprecationWarning, stacklevel=3)
    return old_value


class _MovedModule(types.ModuleType):
    """A module that moved: attribute reads warn once per name and come from the new module."""

    def __init__(self, name: str, target: types.ModuleType):
        super().__init__(name, f"Deprecated alias of {target.__name__}.")
        self.__dict__["_target"] = target

    def __getattr__(self, attr: str):
        target = self.__dict__["_target"]
        if attr.startswith("__"):
            return getattr(target, attr)
        warnings.warn(f"{self.__name__} is now {target.__name__}; import {attr} from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(target, attr)


def alias_module(old_name: str, target: types.ModuleType) -> None:
    """Keep ``import old_name`` / ``from old_name import x`` working after a module moved."""
    sys.modules.setdefault(old_name, _MovedModule(old_name, target))
