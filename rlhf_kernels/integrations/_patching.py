"""The bookkeeping of the integrations' patch() / unpatch() / patched().

    _patches = Patches()

    def patch() -> int:
        if _patches:                                   # already patched
            return 0
        ...version guard...
        _patches.set_item(registry, "grpo", ours)      # a dict entry (verl's registries)
        _patches.set_attr(SomeClass, "method", ours)   # a class or module attribute
        _patches.replace_holders(modules, [(theirs, ours), ...])  # every module attribute
        return len(_patches)                           # holding `theirs` (by identity)

    def unpatch() -> None:
        _patches.undo(modules)      # restores in reverse order; then any module in
                                    # `modules` that imported one of ours while patched
                                    # gets the original back

    patched = patched_block(patch, unpatch)            # the `with patched(): ...` form

Holders are found by identity (`value is theirs`), so a module that imported the
framework's function under another name is patched too, and nothing that merely
shares a name is touched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any


def loaded_modules(package: str) -> list:
    """The loaded modules of `package` (the package and its submodules), from sys.modules."""
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == package or name.startswith(package + "."))
    ]


def _namespace(owner: Any) -> dict:
    try:
        return vars(owner)
    except TypeError:  # an object without a __dict__ holds nothing to patch
        return {}


class Patches:
    """The replacements one integration's patch() made, undone in reverse by undo()."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        # id(ours) -> (ours, the original it replaced): for modules that import ours while patched.
        self._installed: dict[int, tuple[Any, Any]] = {}

    def __len__(self) -> int:
        return len(self._undo)

    def set_attr(self, owner: Any, name: str, value: Any) -> None:
        """owner.name = value (owner a module or class, `name` in its own namespace)."""
        original = _namespace(owner)[name]
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, original))
        self._installed.setdefault(id(value), (value, original))

    def set_item(self, mapping: MutableMapping, key: Any, value: Any) -> None:
        """mapping[key] = value (a registry entry)."""
        original = mapping[key]
        mapping[key] = value
        self._undo.append(lambda: mapping.__setitem__(key, original))
        self._installed.setdefault(id(value), (value, original))

    def replace_holders(self, modules: Iterable[Any], pairs: Iterable[tuple[Any, Any]]) -> int:
        """In every module of `modules`, each attribute that is one of the originals of
        `pairs` ((original, ours), ...) becomes its replacement; returns how many."""
        table = {id(original): (original, ours) for original, ours in pairs}
        count = 0
        for module in _unique(modules):
            for name, value in list(_namespace(module).items()):
                entry = table.get(id(value))
                if entry is not None and entry[0] is value:
                    self.set_attr(module, name, entry[1])
                    count += 1
        return count

    def undo(self, modules: Iterable[Any] = ()) -> None:
        """Restores every replacement, newest first; then every attribute of `modules`
        that still holds one of ours (imported while patched) gets the original back."""
        while self._undo:
            self._undo.pop()()
        for module in _unique(modules):
            for name, value in list(_namespace(module).items()):
                entry = self._installed.get(id(value))
                if entry is not None and entry[0] is value:
                    setattr(module, name, entry[1])
        self._installed.clear()


def _unique(objects: Iterable[Any]) -> list:
    seen, out = set(), []
    for obj in objects:
        if obj is not None and id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    return out


def patched_block(patch: Callable[..., int], unpatch: Callable[[], None]):
    """The context manager `with patched(*args): ...` of an integration: patch(*args) on
    entry, unpatch() on exit when this block patched something (a block entered while
    already patched leaves the outer patch in place)."""

    @contextlib.contextmanager
    def patched(*args, **kwargs):
        count = patch(*args, **kwargs)
        try:
            yield count
        finally:
            if count:
                unpatch()

    patched.__doc__ = f"with patched(): the framework runs on rlhf_kernels inside the block ({patch.__module__})."
    return patched
