"""Dataset readers on small invented fixtures (never lines of the real datasets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data import (
    MNRE_RELATIONS,
    NER_LABELS,
    NO_RELATION,
    DataFormatError,
    NERExample,
    REExample,
    read_mnre,
    read_twitter_conll,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


TWO_TWEETS = (
    "IMGID:111\n"
    "RT\tO\n"
    "@somebody\tO\n"
    "Anna\tB-PER\n"
    "Smith\tI-PER\n"
    "visits\tO\n"
    "Paris\tB-LOC\n"
    "\n"
    "IMGID:222\n"
    "Go\tO\n"
    "Blue\tB-ORG\n"
    "Birds\tI-ORG\n"
    "\n"
)


def test_reads_tweets_with_image_ids(tmp_path):
    examples = read_twitter_conll(write(tmp_path / "train.txt", TWO_TWEETS))
    assert examples == [
        NERExample(
            words=("RT", "@somebody", "Anna", "Smith", "visits", "Paris"),
            tags=("O", "O", "B-PER", "I-PER", "O", "B-LOC"),
            image_id="111.jpg",
        ),
        NERExample(words=("Go", "Blue", "Birds"), tags=("O", "B-ORG", "I-ORG"), image_id="222.jpg"),
    ]


def test_crlf_bom_missing_final_blank_and_repeated_blank_lines(tmp_path):
    text = "IMGID:1\r\nHello\tO\r\nRome\tB-LOC\r\n\r\n\r\n\r\nIMGID:2\r\nBye\tO\r\nOslo\tB-LOC"
    path = write(tmp_path / "crlf.txt", "\ufeff" + text)
    examples = read_twitter_conll(path)
    assert examples == [
        NERExample(("Hello", "Rome"), ("O", "B-LOC"), "1.jpg"),
        NERExample(("Bye", "Oslo"), ("O", "B-LOC"), "2.jpg"),
    ]
    # The BOM is not glued to the first IMGID, and no "\r" is left on tags or words.
    assert examples[0].image_id == "1.jpg"


def test_other_becomes_misc_and_stray_inside_tags_start_entities(tmp_path):
    text = (
        "IMGID:9\n"
        "I-PER\tO\n"  # a token that looks like a tag is just a word
        "Super\tI-OTHER\n"  # I- at sentence start
        "Bowl\tI-OTHER\n"
        "in\tO\n"
        "New\tI-LOC\n"  # I- after O
        "York\tI-LOC\n"
        "Jets\tI-ORG\n"  # I- after another type
        "Cup\tB-OTHER\n"
        "\n"
    )
    (example,) = read_twitter_conll(write(tmp_path / "t.txt", text))
    assert example.tags == ("O", "B-MISC", "I-MISC", "O", "B-LOC", "I-LOC", "B-ORG", "B-MISC")
    assert set(example.tags) <= set(NER_LABELS)


def test_stray_inside_tags_keep_seqeval_spans(tmp_path):
    from seqeval.metrics.sequence_labeling import get_entities

    raw_tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "I-ORG"]
    text = "IMGID:5\n" + "".join(f"w{i}\t{tag}\n" for i, tag in enumerate(raw_tags))
    (example,) = read_twitter_conll(write(tmp_path / "t.txt", text))
    assert get_entities(list(example.tags)) == get_entities(raw_tags)
    assert example.tags == ("B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "I-ORG")


def test_tweet_without_imgid_has_no_image(tmp_path):
    examples = read_twitter_conll(write(tmp_path / "t.txt", "Hi\tO\nBob\tB-PER\n\nIMGID:3\nYo\tO\n"))
    assert [e.image_id for e in examples] == [None, "3.jpg"]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("Paris B-LOC", "field"),  # a space, not a tab
        ("Paris\tB-LOC\tx", "field"),
        ("\tB-LOC", "empty token"),
        ("Paris\tB-CITY", "unknown tag"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, problem):
    path = write(tmp_path / "bad.txt", f"IMGID:1\nfine\tO\n\nIMGID:2\n{bad_line}\n")
    with pytest.raises(DataFormatError) as caught:
        read_twitter_conll(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:5: ")
    assert problem in message
    assert caught.value.line_number == 5


def test_line_numbers_count_crlf_lines_once(tmp_path):
    path = write(tmp_path / "bad.txt", "IMGID:1\r\nfine\tO\r\n\r\noops\r\n")
    with pytest.raises(DataFormatError, match=r":4: "):
        read_twitter_conll(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_twitter_conll(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError):
        read_mnre(tmp_path / "absent.txt")


def mnre_line(**overrides) -> str:
    record = {
        "token": ["RT", "@fan", ":", "Ann", "Lee", "joins", "Acme", "Corp"],
        "h": {"name": "Ann Lee", "pos": [3, 5]},
        "t": {"name": "Acme Corp", "pos": [6, 8]},
        "img_id": "twitter_0_1.jpg",
        "relation": "/per/org/member_of",
    }
    record.update(overrides)
    return repr(record)  # a Python literal with single quotes, as in the MNRE files


def test_relation_names_match_mnre_ids():
    assert len(MNRE_RELATIONS) == 23 and len(set(MNRE_RELATIONS)) == 23
    assert MNRE_RELATIONS[0] == NO_RELATION == "None"
    assert MNRE_RELATIONS.index("/per/org/member_of") == 9
    assert MNRE_RELATIONS[-1] == "/misc/loc/held_on"


def test_reads_mnre_literal_lines_and_skips_blank_lines(tmp_path):
    text = (
        mnre_line()
        + "\n\n"
        + mnre_line(
            token=["It", "'s", "Bob"],
            h={"name": "Bob", "pos": [2, 3]},
            t={"name": "It", "pos": [0, 1]},
            relation="None",
        )
        + "\n"
    )
    examples = read_mnre(write(tmp_path / "mnre.txt", text))
    assert examples == [
        REExample(
            words=("RT", "@fan", ":", "Ann", "Lee", "joins", "Acme", "Corp"),
            head=(3, 5),
            tail=(6, 8),
            relation="/per/org/member_of",
            image_id="twitter_0_1.jpg",
        ),
        REExample(
            words=("It", "'s", "Bob"), head=(2, 3), tail=(0, 1), relation="None", image_id="twitter_0_1.jpg"
        ),
    ]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        (mnre_line(relation="/per/per/friend"), "unknown relation"),
        (mnre_line(h={"name": "x", "pos": [3, 3]}), "empty or outside"),
        (mnre_line(t={"name": "x", "pos": [6, 9]}), "empty or outside"),
        (mnre_line(t={"name": "x", "pos": [-1, 2]}), "empty or outside"),
        (mnre_line(t={"name": "x", "pos": [1]}), "two integers"),
        (mnre_line()[:-5], ""),  # cut off: does not parse
        ("{'token': ['a'], 'h': {'pos': [0, 1]}}", "missing key"),
        ("['not', 'a', 'dict']", "dict"),
    ],
)
def test_malformed_mnre_line_names_file_and_line(tmp_path, bad_line, problem):
    path = write(tmp_path / "mnre.txt", mnre_line() + "\n\n" + bad_line + "\n")
    with pytest.raises(DataFormatError) as caught:
        read_mnre(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert problem in str(caught.value)
