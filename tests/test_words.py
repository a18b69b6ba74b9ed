"""split_words: tweet conventions, character offsets, whitespace, and the dataset round trip."""

from __future__ import annotations

import ast
import os
import random
import string
from pathlib import Path

import pytest

from model.preprocessing.words import split_words


def words_of(text: str) -> list[str]:
    triples = split_words(text)
    for word, start, end in triples:
        assert text[start:end] == word
    return [word for word, _, _ in triples]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Punctuation comes off words; repeated "!" are separate, ellipses are one word.
        ("Hello, world!!!", ["Hello", ",", "world", "!", "!", "!"]),
        ('wait... "what"?!', ["wait", "...", '"', "what", '"', "?", "!"]),
        ("(see below);", ["(", "see", "below", ")", ";"]),
        ("It ends…", ["It", "ends", "…"]),
        # Mentions, hashtags, retweets.
        ("RT @user_1: #GoBulls!", ["RT", "@user_1", ":", "#GoBulls", "!"]),
        ("fans#lfc#ynwa .@POTUS", ["fans", "#lfc", "#ynwa", ".@POTUS"]),
        ("#no-hitter tonight", ["#no-hitter", "tonight"]),
        ("e-mail me: jane.doe@example.com.", ["e-mail", "me", ":", "jane.doe@example.com", "."]),
        # URLs keep everything but the sentence punctuation after them; a truncated one keeps its "…".
        ("see https://t.co/AbC123.", ["see", "https://t.co/AbC123", "."]),
        ("(www.example.com/a?b=c&d=1)", ["(", "www.example.com/a?b=c&d=1", ")"]),
        ("more at http://t.co/Ab…", ["more", "at", "http://t.co/Ab…"]),
        # Emoticons stay whole, unless glued to letters.
        (":) :-( ;P <3 :D &lt;3 ):", [":)", ":-(", ";P", "<3", ":D", "&lt;3", "):"]),
        ("Note:Done (a):", ["Note", ":", "Done", "(", "a", ")", ":"]),
        # Numbers, money, times, scores, fractions.
        ("$10,000.50 2.5% 15:30 3-1 1/2 +1", ["$", "10,000.50", "2.5", "%", "15:30", "3-1", "1/2", "+1"]),
        ("June 21, 2017", ["June", "21", ",", "2017"]),
        # Compounds and abbreviations.
        ("same-sex w/o AT&T, w/ friends", ["same-sex", "w/o", "AT&T", ",", "w/", "friends"]),
        (
            "U.S. Mr. Smith vs. J. Cole at 5 p.m.",
            ["U.S.", "Mr.", "Smith", "vs.", "J.", "Cole", "at", "5", "p.m."],
        ),
        ("H&amp;M &amp; more --&gt;", ["H&amp;M", "&amp;", "more", "--&gt;"]),
        # Contractions as MNRE splits them; other apostrophes stay inside words.
        (
            "don't can't Obama's O'Brien it’s",
            ["do", "n't", "ca", "n't", "Obama", "'s", "O'Brien", "it", "’s"],
        ),
        ("'Late Show' fans'", ["'", "Late", "Show", "'", "fans", "'"]),
        # Emoji: one word per pictograph, with its skin tone, variation selector or ZWJ sequence.
        ("I ❤️ NY👍🏽👍", ["I", "❤️", "NY", "👍🏽", "👍"]),
        (
            "🇺🇸🇬🇧 👨\u200d👩\u200d👧 🏳️\u200d🌈 📷Bookstore",
            ["🇺🇸", "🇬🇧", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "📷", "Bookstore"],
        ),
        # Combining marks stay with their letter; other scripts.
        (
            "Cafe\u0301 nai\u0308ve, re\u0301sume\u0301!",
            ["Cafe\u0301", "nai\u0308ve", ",", "re\u0301sume\u0301", "!"],
        ),
        ("हिन्दी भाषा ไทยภาษา", ["हिन्दी", "भाषा", "ไทยภาษา"]),
        ("北京欢迎你！東京、大阪", ["北京欢迎你", "！", "東京", "、", "大阪"]),
        ("Привет,мир! مرحبا بالعالم", ["Привет", ",", "мир", "!", "مرحبا", "بالعالم"]),
    ],
)
def test_tricky_strings(text, expected):
    assert words_of(text) == expected


def test_every_kind_of_whitespace_separates_words():
    text = " a\tb\nc\u00a0d\u200be\u3000f\r\ng\u2009h\ufeffi\u2028j "
    triples = split_words(text)
    assert [w for w, _, _ in triples] == list("abcdefghij")
    assert [s for _, s, _ in triples] == [1, 3, 5, 7, 9, 11, 14, 16, 18, 20]
    assert split_words("") == [] and split_words(" \t\u200b\n") == []


def test_random_text_offsets_cover_every_visible_character():
    # Words never overlap, never hold whitespace, and together keep every non-separator character.
    separators = " \t\n\u00a0\u200b\u3000"
    pool = list("aZ9_'’-.,:;!?@#$%&*/()\"…<>3") + [
        "\u0301",
        "\u200d",
        "\ufe0f",
        "😀",
        "🏽",
        "🇫",
        "北",
        "ह",
        "ि",
    ]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pool + list(separators)) for _ in range(rng.randint(0, 15)))
        triples = split_words(text)
        previous_end = 0
        for word, start, end in triples:
            assert text[start:end] == word and word and start >= previous_end
            assert not any(ch.isspace() or ch in separators for ch in word)
            previous_end = end
        visible = "".join(ch for ch in text if not (ch.isspace() or ch in separators))
        assert "".join(w for w, _, _ in triples) == visible


# Invented tweets, tokenised in each dataset's style: joined by spaces, they must split back the same.
DATASET_STYLE_TWEETS = [
    [
        "RT",
        "@JaneDoe",
        ":",
        "Obama",
        "'s",
        "trip",
        "to",
        "the",
        "U.S.",
        "-",
        "#politics",
        "http://t.co/AbCdEf123",
    ],
    ["I", "don", "'", "t", "know", "…", "#", "NoSleep", "@", "SomeFan"],
    ["Love", "it", "❤", "️", "😂", "🏽", "\u200d", "♀", "!"],
    ["same-sex", "w/", "friends", ",", "12-year-old", "scores", "10,000", "at", "2.5", "%"],
    ["Tom", "&amp", ";", "Jerry", "--&gt", "https", ":", "//t", ".", "co/AbC12", "htt…", "http://t.co/Xy…"],
    ["I", "'m", "sure", "they", "do", "n't", "'ll", "'re", "'ve", ":)", "<3", "...", "Mr.", "J.", "p.m."],
    ["$AAPL", "up", "+3", "in", "#B-52s", "news", ".@Acme", "w/o", "Y'all", "O'Brien", "15:30"],
]


@pytest.mark.parametrize("tokens", DATASET_STYLE_TWEETS)
def test_dataset_tokens_join_and_split_back(tokens):
    assert words_of(" ".join(tokens)) == tokens


DATA_DIR = Path(os.environ.get("IMM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _conll_tweets(path: Path) -> list[list[str]]:
    tweets, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("IMGID:") or not line.strip():
            if current:
                tweets.append(current)
            current = []
        else:
            current.append(line.split("\t")[0])
    return tweets + ([current] if current else [])


@pytest.mark.parametrize(
    ("relative_path", "minimum_share"),
    [("twitter2015/train.txt", 0.96), ("twitter2017/train.txt", 0.985), ("mnre/valid.txt", 0.975)],
)
def test_round_trip_share_on_the_real_datasets(relative_path, minimum_share):
    """A regression guard where the datasets are at hand (../shared/data or $IMM_DATA_DIR); skipped elsewhere.

    The tweets that do not come back hold the datasets' own tokeniser slips, which raw-text splitting should
    not copy: punctuation left on a word ("people\\"", "-Albert", "no!"), "21," in Twitter-2017, "lt;3" and
    ".POTUS" in MNRE.
    """
    path = DATA_DIR / relative_path
    if not path.exists():
        pytest.skip(f"{path} not available")
    if path.parent.name == "mnre":
        lines = path.read_text(encoding="utf-8").splitlines()
        tweets = [ast.literal_eval(line)["token"] for line in lines if line.strip()]
    else:
        tweets = _conll_tweets(path)
    same = sum(words_of(" ".join(tokens)) == tokens for tokens in tweets)
    assert same / len(tweets) >= minimum_share


# --- linear time ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regex_steps():
    from tests.regex_steps import RegexSteps

    try:
        return RegexSteps()
    except OSError as error:  # pragma: no cover - every Debian system has libpcre2-8 (grep needs it)
        pytest.skip(f"libpcre2-8 is not available to count regex steps: {error}")


def regex_work(regex_steps, monkeypatch, text: str) -> int:
    """The regex steps ``split_words(text)`` takes: every search it makes, replayed on PCRE2."""
    import re

    from model.preprocessing import words
    from tests.regex_steps import RecordingPattern

    log: list = []
    with monkeypatch.context() as patch:
        for name, value in vars(words).items():
            if isinstance(value, re.Pattern):
                patch.setattr(words, name, RecordingPattern(value, log))
        words.split_words(text)
    before = regex_steps.steps
    for search in log:
        regex_steps.replay(*search)
    return regex_steps.steps - before


RUNS = [
    (prefix, char, suffix)
    for prefix in ("http://", "https://", "www.", "@", "#")
    for char in string.punctuation
    for suffix in ("", "a")
] + [("", "a" + char, suffix) for char in string.punctuation for suffix in ("", "a")]


def test_split_words_work_grows_linearly_on_long_runs_of_punctuation(regex_steps, monkeypatch):
    """Counts regex steps, times nothing: after each URL, mention and hashtag prefix, a run of each
    ASCII punctuation character (then nothing, or a letter), and runs of letter + punctuation
    ("a+a+a+..."). The work on 40, 80 and 120 characters must grow by equal steps (the second
    difference is 0 for linear work; before the fix, "http://" + 40 dots + "a" had 1,600)."""
    quadratic = []
    for prefix, unit, suffix in RUNS:
        work = [
            regex_work(regex_steps, monkeypatch, prefix + unit * (40 * k // len(unit)) + suffix)
            for k in (1, 2, 3)
        ]
        growth = (work[1] - work[0], work[2] - work[1])
        if growth[1] - growth[0] > 0.1 * growth[0]:
            quadratic.append((prefix + unit + "..." + suffix, work))
    assert not quadratic, f"work grows faster than the text on {len(quadratic)} runs: {quadratic[:5]}"
    assert len(RUNS) == 5 * 32 * 2 + 32 * 2
