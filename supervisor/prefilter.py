"""The needles: the literals a line must hold to matter, so that most lines are never parsed.

api-blast prints far more than session changes (a dump per send, QR codes, Baileys' chatter).
Reading a large log, or a busy one, stays cheap because a line is looked at only when it holds
one of a few literals: those every match of a rule must contain (worked out from the rule's
regex by :func:`literal_needles`), the structural ones a multi-line record starts with, and
those the parse-error counter wants. A needle holding another is dropped; needles sharing a
long substring are merged (:func:`merge_needles`); :func:`line_ends` then finds the lines that
hold any of them with one ``str.find`` pass per needle.

A leaf module: the rules (:mod:`supervisor.events`), the record assembler
(:mod:`supervisor.records`), the intake and the metrics all take their needles from here.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

# Lines that can matter whatever the rules: a block starts only on a line holding a bracket or
# an ``…Error: `` (and a JSON line, the only kind parse decodes, holds ``{``).
STRUCTURAL_NEEDLES = ("{", "[", "Error")
STRUCTURAL_NEEDLES_SET = frozenset(STRUCTURAL_NEEDLES)

# Every record :func:`parse_error_kind` can count holds one of these (the intake's fast path
# hands only those records to the metrics).
PARSE_ERROR_NEEDLES = ('{"', "\ufffd")

_RE_PARSER: Any = importlib.import_module("re._parser")
_RE_CONSTANTS: Any = importlib.import_module("re._constants")
_RE_LITERAL: Any = _RE_CONSTANTS.LITERAL
_RE_SUBPATTERN: Any = _RE_CONSTANTS.SUBPATTERN
_RE_BRANCH: Any = _RE_CONSTANTS.BRANCH


def _parsed(pattern: re.Pattern[str]) -> list[tuple[Any, Any]] | None:
    """The top-level items of ``pattern`` as the regex parser sees them; None when the
    pattern ignores case (its literals are not exact)."""
    if pattern.flags & re.IGNORECASE:
        return None
    parsed = _RE_PARSER.parse(pattern.pattern, pattern.flags)
    return None if parsed.state.flags & re.IGNORECASE else list(parsed.data)


def _longest_run(items: list[tuple[Any, Any]]) -> str:
    """The longest run of plain literals in ``items``."""
    best, run = "", []
    for op, arg in [*items, (None, None)]:
        if op is _RE_LITERAL:
            run.append(chr(arg))
            continue
        best = max(best, "".join(run), key=len)
        run = []
    return best


def literal_needle(pattern: re.Pattern[str]) -> str | None:
    """The longest run of plain literals at the top level of ``pattern`` (two characters or
    more), which every match must contain; None when there is none or it is not exact."""
    try:
        items = _parsed(pattern)
        best = "" if items is None else _longest_run(items)
    except Exception:  # the regex module's internals changed: no needle, always searched
        return None
    return best if len(best) >= 2 else None


def literal_needles(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    """Literals (two characters or more) one of which every match of ``pattern`` contains:
    :func:`literal_needle` when there is one, else the needles of each branch of a required
    alternation (``^(?:Last disconnect error|Connection closed, reason)…``); None when none
    is exact."""
    try:
        items = _parsed(pattern)
        return None if items is None else _needles_of(items)
    except Exception:  # the regex module's internals changed: no needles, always searched
        return None


def required_chars(pattern: re.Pattern[str]) -> frozenset[str]:
    """Characters every match of ``pattern`` contains (its literals outside any repeat,
    group or alternation); empty when not known."""
    try:
        items = _parsed(pattern)
        if items is None:
            return frozenset()
        return frozenset(chr(arg) for op, arg in items if op is _RE_LITERAL)
    except Exception:  # the regex module's internals changed: nothing known
        return frozenset()


def _needles_of(items: list[tuple[Any, Any]]) -> tuple[str, ...] | None:
    """Needles of a sequence of parsed regex items (every match of the sequence holds one)."""
    best = _longest_run(items)
    if len(best) >= 2:
        return (best,)
    for op, arg in items:
        if op is _RE_SUBPATTERN:
            _group, add_flags, _del_flags, sub = arg
            if add_flags & re.IGNORECASE:
                continue
            found = _needles_of(list(sub))
        elif op is _RE_BRANCH:
            alternatives = [_needles_of(list(b)) for b in arg[1]]
            if any(a is None for a in alternatives):
                continue
            found = tuple(n for a in alternatives if a is not None for n in a)
        else:
            continue
        if found:
            return found
    return None


def merge_needles(needles: Iterable[str], min_len: int = 8) -> tuple[str, ...]:
    """Fewer needles to search for, with the same lines found (and perhaps a few more): a
    needle holding another is dropped, and needles sharing a substring of ``min_len``
    characters or more are replaced by it (``Connection update: `` and ``Connection closed,
    reason`` by ``Connection ``). Each needle costs one pass over the text."""
    current = minimal(needles)
    while True:
        best = ""
        for i, a in enumerate(current):
            for b in current[i + 1:]:
                match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(
                    0, len(a), 0, len(b))
                common = a[match.a:match.a + match.size]
                covers = sum(common in c for c in current)
                if match.size >= min_len and (
                        covers > sum(best in c for c in current) if best else True):
                    best = common
        if not best:
            return tuple(current)
        current = minimal([best, *current])


def line_ends(text: str, needles: Iterable[str]) -> list[int]:
    """Where (the ``\\n``) each line of ``text`` holding one of ``needles`` ends, in order:
    one ``str.find`` pass per needle, at C speed."""
    wanted = minimal(needles)
    if "" in wanted:
        raise ValueError("an empty needle: every line matters")
    ends: set[int] = set()
    find = text.find
    for needle in wanted:
        p = find(needle)
        while p >= 0:
            e = find("\n", p)
            ends.add(e)
            p = find(needle, e + 1)
    return sorted(ends)


def minimal(needles: Iterable[str]) -> list[str]:
    """``needles`` without those holding another one (a line with it holds the other too)."""
    return list(_minimal_of(tuple(needles)))


@functools.lru_cache(maxsize=64)
def _minimal_of(needles: tuple[str, ...]) -> tuple[str, ...]:
    unique = sorted(set(needles), key=len)
    out: list[str] = []
    for needle in unique:
        if not any(other in needle for other in out):
            out.append(needle)
    return tuple(out)


class NeedledRule(Protocol):
    """What :func:`rule_needles` reads of a rule (:class:`supervisor.events.Rule`)."""

    @property
    def pattern(self) -> re.Pattern[str]: ...

    @property
    def ignore(self) -> bool: ...

    @property
    def needles(self) -> tuple[str, ...] | None: ...


def rule_needles(rules: Sequence[NeedledRule], extra: Sequence[str] = ()
                 ) -> tuple[str, ...] | None:
    """What a record must hold to matter to ``rules`` (and to whoever wants ``extra``), merged;
    None when that is not known (a rule without needles: every record must be parsed)."""
    needles: list[str] = list(extra)
    for r in rules:
        if r.ignore:
            continue  # it can only silence a record: one without needles gives nothing
        if not STRUCTURAL_NEEDLES_SET.isdisjoint(required_chars(r.pattern)):
            continue  # a match holds ``{`` or ``[``: the scan looks at such lines anyway
        if r.needles is None:
            return None
        needles.extend(r.needles)
    if "" in needles:
        return None  # every record wanted
    return merge_needles((*needles, *STRUCTURAL_NEEDLES))
