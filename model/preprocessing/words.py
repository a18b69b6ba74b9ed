"""Split raw tweet text into words the way the Twitter-2015/2017 and MNRE datasets are tokenised.

The models are trained on pre-tokenised tweets, so at serving time raw text must be cut into the same kind
of words: punctuation split off, while @mentions, #hashtags, URLs, e-mail addresses, emoticons, emoji
sequences, numbers ("10,000", "2.5", "15:30"), abbreviations ("U.S.", "Mr.") and hyphenated or slashed
compounds ("same-sex", "w/o") stay whole. Contractions are split as in MNRE (Penn Treebank style: "don't"
-> "do" "n't", "Obama's" -> "Obama" "'s"); other inner apostrophes stay ("O'Brien", "c'est").

The key property (tested, and measured on the datasets) is that joining a dataset tweet's tokens with
single spaces and splitting again gives back the tokens: the splitter never cuts a dataset token further.

Splitting is linear in the text's length, whatever the text (a request must not hold the GIL for seconds):
no alternative scans far ahead and then fails at every position of a run (the URL takes the rest of its
chunk and gives back the sentence punctuation in Python; see ``_TOKEN_WITHOUT_EMAIL_RE`` for e-mail
addresses). tests/test_words.py counts the regex engine's steps on long runs of every ASCII punctuation
character to keep it so.

Stdlib only (``re`` and ``unicodedata``): the server imports this module.
"""

from __future__ import annotations

import re
import sys
import unicodedata

__all__ = ["split_words"]


def _char_class_ranges(codepoints: list[int]) -> str:
    """Render sorted code points as the body of a regex character class, merging runs into ranges."""
    parts: list[str] = []
    start = prev = codepoints[0]
    for cp in [*codepoints[1:], -1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(
            re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}"
        )
        start = prev = cp
    return "".join(parts)


def _combining_marks() -> str:
    """Character-class body for every combining mark (Unicode categories Mn, Mc, Me).

    Python's ``\\w`` does not match combining marks, so "é" written as e + U+0301, Devanagari vowel signs or
    Thai tone marks would otherwise be cut off their base letter. Marks only live below U+20000 and in the
    variation selectors supplement, so scanning those ranges is enough (about 30 ms, once at import).
    """
    candidates = [*range(0x300, 0x20000), *range(0xE0100, 0xE01F0)]
    marks = [cp for cp in candidates if unicodedata.category(chr(cp)).startswith("M")]
    # Zero-width (non-)joiners shape Persian and Indic words and glue emoji sequences: keep them inside words.
    return _char_class_ranges(marks) + "\u200c\u200d"


# Characters that separate words besides str.isspace() ones: invisible "spaces" that Python does not
# count as whitespace (zero-width space, word joiner, BOM / zero-width no-break space, Mongolian vowel sep.).
_INVISIBLE_SEPARATORS = "\u200b\u2060\ufeff\u180e"
_CHUNK_RE = re.compile(rf"[^\s{_INVISIBLE_SEPARATORS}]+")

_MARK = f"[{_combining_marks()}]"
# A word character: letter, digit or underscore (any script), or a combining mark.
_W = rf"(?:\w|{_MARK})"

# Pictographic code points (emoji and the symbol blocks they come from). Not \w, so they never merge
# into words. Regional indicators (flags) are handled in pairs before this class is tried.
_EMOJI_BASE = (
    "["
    "\U0001f000-\U0001faff"  # mahjong .. symbols and pictographs extended-A (includes skin tones)
    "\u2600-\u27bf"  # miscellaneous symbols, dingbats
    "\u2300-\u23ff"  # miscellaneous technical (watch, hourglass, ...)
    "\u2b00-\u2bff"  # arrows and stars
    "\u2190-\u21ff"  # arrows
    "\u25a0-\u25ff"  # geometric shapes
    "\u2934\u2935\u3030\u303d\u3297\u3299\u00a9\u00ae\u203c\u2049\u2122\u2139\u24c2"
    "]"
)
# What may follow an emoji inside one pictograph: variation selectors, skin tones, keycap, tag characters.
_EMOJI_MODIFIER = "[\ufe0e\ufe0f\U0001f3fb-\U0001f3ff\u20e3\U000e0020-\U000e007f]"
_EMOJI = rf"(?:[\U0001f1e6-\U0001f1ff]{{2}}|{_EMOJI_BASE}{_EMOJI_MODIFIER}*(?:\u200d{_EMOJI_BASE}{_EMOJI_MODIFIER}*)*)"

# Titles, months and company suffixes that keep their period, as in MNRE ("Mr.", "St.", "Nov.").
_ABBREVIATIONS = (
    "Mr|Mrs|Ms|Dr|Prof|St|Sr|Jr|Mt|Ft|Gov|Gen|Sen|Rep|Rev|Sgt|Capt|Lt|Col|Co|Corp|Inc|Ltd|Bros|No|Vol"
    "|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Ave|Blvd|Fla|Calif|vs|Vs|etc|approx"
)
# Characters that may end a sentence right after a URL: they are not part of it.
_URL_TRAILING = frozenset(""".,;:!?'"”’)]}>""")

_TOKEN_PATTERN = rf"""
    # URLs: the rest of the chunk (split_words then gives back the sentence punctuation at its end;
    # a truncated "http://t.co/ab…" keeps its "…").
      (?P<url>(?i:https?://|www\.))\S*
    # What is left of a URL cut by a retweet: "h…", "htt…", "https:/…".
    | (?P<cut_url>(?i:h(?:t(?:t(?:ps?)?)?)?(?::/{{0,2}})?…))
    # E-mail addresses.
    | (?P<email>[\w.+-]+@\w[\w-]*(?:\.[\w-]+)+)
    # ".@user" (a tweet convention to make a reply public) at the start of a chunk, then @mentions,
    # #hashtags (with inner hyphens and slashes, as the datasets keep "#no-hitter", "#7/7") and $cashtags.
    | ^\.@\w+
    | @\w+
    | \#{_W}+(?:[-/]{_W}+)*
    | \$[A-Za-z]+(?!{_W})
    # Emoticons :) :-( ;P :'( ): <3 </3 (or "&lt;3"), not glued to letters on either side ("Note:Don't", "(a):").
    | (?<![\w]) (?:
          [<>]?[:;=][-o*']?[)\](\[dDpP/:}}{{@|\\]+
        | [)\](\[}}{{@|\\][-o*']?[:;=][<>]?
        | (?:<|&lt;)/?3+
      ) (?![\w])
    | {_EMOJI}
    # HTML entities left escaped in tweet text ("&amp;", or "&amp" when ";" was split off).
    | &(?:amp|lt|gt|quot|apos|\#\d+);?
    # Abbreviations that keep their periods: "U.S.", "p.m.", titles, single capital initials ("J.").
    | (?:[A-Za-z]\.){{2,}}(?!{_W})
    | (?:{_ABBREVIATIONS})\.(?!{_W})
    | [A-Z]\.(?!{_W})
    # Standalone clitics when a tweet was already split ("Obama 's", "I 'm").
    | ^(?i:['’](?:s|re|ve|ll|d|m|em|cause|cuz|til))(?!{_W})
    # "w/" (with) is a word of its own; arrows, often HTML-escaped: "->", "--&gt;", "<--".
    | (?i:w/)(?!{_W})
    | -+(?:&gt;?|>) | (?:&lt;?|<)-+
    # Words: runs of word characters joined by inner hyphens, slashes, ampersands, periods, apostrophes and
    # asterisks ("same-sex", "w/o", "AT&T", "U.S.A", "O'Brien", "Sh*t"), commas and colons only between
    # digits ("10,000", "15:30"). A chunk may start with "/" or "//" (a broken URL "//t.co", "/r/news") or
    # with the sign of a number ("+1", "-17").
    | (?P<word> (?: ^/{{1,2}}(?={_W}) | ^[-+](?=\d) )?{_W}+
      (?: (?: &(?:amp|lt|gt|quot);(?={_W}) | [-/&.'’`*](?={_W}) | (?<=\d)[,:](?=\d) ) {_W}+ )* )
    # Runs: ellipses "..." and repeated symbols "--", "***", "||" stay together; "!!!" does not.
    | \.{{2,}}
    | (?P<run>[-*|/=~_+^])(?P=run)+
    # Anything else is a word of one character, with its combining marks.
    | .{_MARK}*
    """
_TOKEN_RE = re.compile(_TOKEN_PATTERN, re.VERBOSE | re.DOTALL)

# Linear time. An e-mail address is found by scanning a run of address characters for the "@" after
# it; when that fails at one position of a run, it fails at every later position of the same run (the
# scan ends at the same place, before the same characters), so the rest of the run is matched without
# the e-mail alternative ((?!) never matches): a run of 10,000 "a+" is scanned once, not 10,000 times.
_ADDRESS_RUN_RE = re.compile(r"[\w.+-]+")
_EMAIL_ALTERNATIVE = "(?P<email>[\\w.+-]+@\\w[\\w-]*(?:\\.[\\w-]+)+)"
assert _EMAIL_ALTERNATIVE in _TOKEN_PATTERN
_TOKEN_WITHOUT_EMAIL_RE = re.compile(
    _TOKEN_PATTERN.replace(_EMAIL_ALTERNATIVE, "(?P<email>(?!))"), re.VERBOSE | re.DOTALL
)

# Contractions split off the end of a word, Penn Treebank style as in MNRE: "do|n't", "Obama|'s".
_CLITIC_RE = re.compile(r"(?i)(.+?)(n['’]t|['’](?:s|re|ve|ll|d|m))")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Split raw text into ``(word, start_char, end_char)`` triples with ``text[start:end] == word``.

    Whitespace of any kind, including zero-width spaces, separates words and never appears in one.
    """
    words: list[tuple[str, int, int]] = []
    for chunk_match in _CHUNK_RE.finditer(text):
        # Match each whitespace-free chunk on its own, so that ^ and $ in the patterns mean "chunk edge".
        chunk, offset = chunk_match.group(), chunk_match.start()
        position = no_email_before = 0
        while position < len(chunk):
            # Every position matches (the last alternative takes any one character), and ``match`` at
            # ``position`` keeps ^ and lookbehinds seeing the whole chunk.
            pattern = _TOKEN_WITHOUT_EMAIL_RE if position < no_email_before else _TOKEN_RE
            match = pattern.match(chunk, position)
            assert match is not None
            end = match.end()
            if pattern is _TOKEN_RE and match.lastgroup not in ("url", "cut_url", "email"):
                # The e-mail alternative was tried here and failed: skip it for the rest of this run.
                run = _ADDRESS_RUN_RE.match(chunk, position)
                no_email_before = run.end() if run else position
            if match.group("url") is not None:
                # The URL ends before the sentence punctuation that ends the chunk ("see http://x.co).").
                while end > match.end("url") and chunk[end - 1] in _URL_TRAILING:
                    end -= 1
            start, token = position, chunk[position:end]
            clitic = _CLITIC_RE.fullmatch(token) if match.group("word") else None
            if clitic:
                split_at = offset + start + clitic.end(1)
                words.append((text[offset + start : split_at], offset + start, split_at))
                words.append((text[split_at : offset + end], split_at, offset + end))
            else:
                words.append((token, offset + start, offset + end))
            position = end
    return words


if __name__ == "__main__":  # pragma: no cover - a small manual check
    for line in sys.stdin:
        print(" | ".join(word for word, _, _ in split_words(line)))
