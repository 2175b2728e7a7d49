"""One registry helper for every extension axis: PFT strategies, general-FL algorithms, partition schemes, shifts.

A :class:`Registry` maps names to entries (classes) in registration order, checks an entry before adding it
(as peft checks the methods it registers), refuses a name registered twice, and fails on an unknown name
with the one-line message its owner words (each axis names its own config key and its own error type).
It is a read-only ``Mapping`` (``name in REG``, ``REG[name]``, ``REG.get(name)``, ``sorted(REG)``); only
:meth:`Registry.register` and :meth:`Registry.unregister` change it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: What an entry is, as the duplicate-name error says it ("strategy", "partition scheme").
        unknown: Builds the error raised for an unknown name from (name, registered names in order).
        check: Validates an entry before it is added (raises TypeError / ValueError naming what is wrong).
    """

    def __init__(self, kind: str, *, unknown: Callable[[str, list[str]], Exception],
                 check: Callable[[T], None] | None = None):
        self.kind = kind
        self._unknown = unknown
        self._check = check
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under ``entry.name`` after the check; usable as a class decorator."""
        if self._check is not None:
            self._check(entry)
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove ``name`` (e.g. an entry a test registered); returns the entry. Unknown names fail."""
        return self._entries.pop(self.lookup(name).name)

    def lookup(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises the owner's one-line error (``get`` keeps
        ``Mapping``'s meaning: None for an unknown name)."""
        if name not in self._entries:
            raise self._unknown(name, list(self._entries))
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names in registration order."""
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def check_entry_class(cls: object, base: type, *, kind: str, own: tuple[str, ...]) -> None:
    """The common part of every registry's check: ``cls`` is a subclass of ``base`` that sets each class attribute
    in ``own`` itself (a subclass must not show its parent's name) as a non-empty string.

    Raises:
        TypeError: ``register_<kind> takes a <base> subclass, not ...`` or ``<kind> class <cls> must set ...``.
    """
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"register_{kind} takes a {base.__name__} subclass, not {cls!r}")
    for attr in own:
        if not isinstance(vars(cls).get(attr), str) or not vars(cls)[attr].strip():
            raise TypeError(f"{kind} class {cls.__name__} must set the class attribute {attr!r} itself "
                            f"(a non-empty string), got {vars(cls).get(attr)!r}")


def import_entries(package: str, path, skip: frozenset[str] = frozenset({"base"})) -> None:
    """Import every module of ``package`` (its ``__path__``) but ``skip`` and private ones, in name order: a file
    dropped into a registry's folder registers its entries by decorator."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
