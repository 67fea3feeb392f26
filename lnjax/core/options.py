"""Config objects for functions with many settings: a frozen dataclass of options, and keyword arguments folded
into it, so that ``f(x, options)`` and the older ``f(x, chunk=2, progress=False)`` both work."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, TypeVar

T = TypeVar("T")


def fold(cls: type[T], options: Optional[T], overrides: dict[str, Any], where: str) -> T:
    """``options`` (an instance of the frozen dataclass ``cls``; None: its defaults) with the keyword arguments
    ``overrides`` folded in, the keywords winning. TypeError naming ``where`` and any keyword that is not a field
    of ``cls``, as Python names an unexpected keyword argument."""
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise TypeError(f"{where}: options must be a {cls.__name__}, got {type(options).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; the {cls.__name__} fields are "
                        f"{sorted(fields)}")
    return dataclasses.replace(options, **overrides) if overrides else options
