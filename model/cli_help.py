"""The ``--help`` of every command (``imm serve/train/evaluate/export/extract`` and their ``python -m``
forms): each option's default, and descriptions as whole paragraphs of the module's docstring."""

from __future__ import annotations

import argparse
import re

# Actions whose default says nothing: flags (on or off), --help, --version.
_NO_DEFAULT_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._HelpAction,
    argparse._VersionAction,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's ``ArgumentDefaultsHelpFormatter`` (``(default: ...)`` after each option's help),
    without ``default: None`` or ``default: False`` on flags, and not twice where the help already
    says its default; descriptions and epilogs keep their lines (examples stay as written)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default in (None, argparse.SUPPRESS)
            or action.required
            or isinstance(action, _NO_DEFAULT_ACTIONS)
            or re.search(r"\(default\b|%\(default\)", text)
        ):
            return text
        return super()._get_help_string(action)


def paragraph(doc: str | None, index: int = 0) -> str:
    """The ``index``-th paragraph of a docstring, whole (a description cut at its first line break
    would end mid-sentence)."""
    paragraphs = [part.strip() for part in (doc or "").strip().split("\n\n")]
    return paragraphs[index]
