"""Module-name matching with PEFT's rules, so foldkit targets exactly the modules PEFT did."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


def matches_module_list(name: str, entries: str | Iterable[str] | None) -> bool:
    """Return whether `name` is selected by a PEFT module list.

    A string is a regular expression matched against the whole name. A list selects a name equal to an
    entry or ending in "." plus the entry (target_modules' rule).
    """
    if entries is None:
        return False
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def is_feedforward(name: str, feedforward_modules: str | Iterable[str] | None) -> bool:
    """Return whether IA3 scales the input of `name` (PEFT's feedforward rule).

    A string is a regular expression matched against the whole name; a list matches by plain suffix
    (`name.endswith(entry)`), as PEFT's IA3 does.
    """
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def pattern_value(name: str, patterns: Mapping[str, object] | None, default):
    """Return the rank_pattern or alpha_pattern value for `name`, else `default`.

    The first key, in dict order, that matches `(.*\\.)?(KEY)$` at the start of the name wins.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
