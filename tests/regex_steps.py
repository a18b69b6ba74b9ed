"""Counts the work of a regular expression: the steps PCRE2 takes to run the same pattern.

Python's ``re`` counts nothing. PCRE2, the C library behind grep (``libpcre2-8``, on every Debian
system), is a backtracking engine with Perl's semantics, like ``re``: with its optimisations off
and an automatic callout before every item of the pattern, the number of callouts counts the
items tried, each backtracking step included (a greedy repeat that gives back characters one at a
time calls out once per character). ``RegexSteps.replay`` runs what ``re`` was asked to do (one
``match``, ``fullmatch`` or ``finditer``) and checks that PCRE2 finds the same spans, so that the
steps counted are those of the same search.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

# pcre2.h
_CASELESS, _DOTALL, _EXTENDED = 0x8, 0x20, 0x80
_NO_AUTO_POSSESS, _NO_DOTSTAR_ANCHOR, _NO_START_OPTIMIZE = 0x4000, 0x8000, 0x10000
_UCP, _UTF, _AUTO_CALLOUT = 0x20000, 0x80000, 0x4
_ANCHORED, _ENDANCHORED, _NO_UTF_CHECK = 0x80000000, 0x20000000, 0x40000000
_CALLOUT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL("libpcre2-8.so.0")
    lib.pcre2_compile_8.restype = ctypes.c_void_p
    lib.pcre2_compile_8.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
    ]
    lib.pcre2_match_data_create_from_pattern_8.restype = ctypes.c_void_p
    lib.pcre2_match_data_create_from_pattern_8.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.pcre2_match_context_create_8.restype = ctypes.c_void_p
    lib.pcre2_match_context_create_8.argtypes = [ctypes.c_void_p]
    lib.pcre2_set_callout_8.argtypes = [ctypes.c_void_p, _CALLOUT, ctypes.c_void_p]
    lib.pcre2_match_8.restype = ctypes.c_int
    lib.pcre2_match_8.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.pcre2_get_ovector_pointer_8.restype = ctypes.POINTER(ctypes.c_size_t)
    lib.pcre2_get_ovector_pointer_8.argtypes = [ctypes.c_void_p]
    return lib


class RegexSteps:
    """Runs Python patterns on PCRE2 and counts the steps (``self.steps``, cumulative)."""

    def __init__(self) -> None:
        self.lib = _library()  # OSError where libpcre2-8 is missing
        self.steps = 0

        def callout(_block: Any, _data: Any) -> int:
            self.steps += 1
            return 0

        self._callout = _CALLOUT(callout)  # kept: PCRE2 holds a pointer to it
        self.context = self.lib.pcre2_match_context_create_8(None)
        self.lib.pcre2_set_callout_8(self.context, self._callout, None)
        self._compiled: dict[tuple[str, int], tuple[int, int]] = {}

    def _code(self, pattern: re.Pattern) -> tuple[int, int]:
        key = (pattern.pattern, pattern.flags)
        if key not in self._compiled:
            options = _UTF | _UCP | _AUTO_CALLOUT | _NO_AUTO_POSSESS | _NO_START_OPTIMIZE | _NO_DOTSTAR_ANCHOR
            options |= _EXTENDED if pattern.flags & re.VERBOSE else 0
            options |= _DOTALL if pattern.flags & re.DOTALL else 0
            options |= _CASELESS if pattern.flags & re.IGNORECASE else 0
            # Python's \uXXXX and \UXXXXXXXX are PCRE2's \x{...}; the rest of the syntax is shared.
            source = re.sub(
                r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))",
                lambda m: "\\x{%s}" % (m.group(1) or m.group(2)),
                pattern.pattern,
            ).encode()
            error, offset = ctypes.c_int(), ctypes.c_size_t()
            code = self.lib.pcre2_compile_8(
                source, len(source), options, ctypes.byref(error), ctypes.byref(offset), None
            )
            if not code:
                raise ValueError(
                    f"PCRE2 error {error.value} at {source[offset.value - 20 : offset.value + 20]!r}"
                )
            self._compiled[key] = (code, self.lib.pcre2_match_data_create_from_pattern_8(code, None))
        return self._compiled[key]

    def _match(self, pattern: re.Pattern, text: str, pos: int, options: int) -> tuple[int, int] | None:
        code, data = self._code(pattern)
        subject = text.encode()
        offsets = [0]  # byte offset of each character
        for ch in text:
            offsets.append(offsets[-1] + len(ch.encode()))
        found = self.lib.pcre2_match_8(
            code, subject, len(subject), offsets[pos], options | _NO_UTF_CHECK, data, self.context
        )
        if found < 0:
            return None
        vector = self.lib.pcre2_get_ovector_pointer_8(data)
        characters = {byte: number for number, byte in enumerate(offsets)}
        return characters[vector[0]], characters[vector[1]]

    def replay(self, method: str, pattern: re.Pattern, text: str, pos: int, spans: Any) -> None:
        """Runs ``pattern.<method>(text, pos)`` on PCRE2; asserts it finds ``spans``, as ``re`` did."""
        if method == "finditer":
            found, start = [], pos
            while start <= len(text) and (span := self._match(pattern, text, start, 0)) is not None:
                found.append(span)
                start = span[1] if span[1] > span[0] else span[1] + 1
        else:
            found = self._match(
                pattern, text, pos, _ANCHORED | (_ENDANCHORED if method == "fullmatch" else 0)
            )
        assert found == spans, (
            f"PCRE2 and re differ on {pattern.pattern[:40]!r}.{method}({text[:40]!r}, {pos})"
        )


class RecordingPattern:
    """A compiled pattern that records the searches made with it (for ``RegexSteps.replay``)."""

    def __init__(self, pattern: re.Pattern, log: list):
        self.pattern, self.log = pattern, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pattern, name)

    def match(self, text: str, pos: int = 0):
        found = self.pattern.match(text, pos)
        self.log.append(("match", self.pattern, text, pos, found and found.span()))
        return found

    def fullmatch(self, text: str, pos: int = 0):
        found = self.pattern.fullmatch(text, pos)
        self.log.append(("fullmatch", self.pattern, text, pos, found and found.span()))
        return found

    def finditer(self, text: str, pos: int = 0):
        self.log.append(
            ("finditer", self.pattern, text, pos, [m.span() for m in self.pattern.finditer(text, pos)])
        )
        return self.pattern.finditer(text, pos)
