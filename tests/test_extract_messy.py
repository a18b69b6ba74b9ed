"""``imm extract`` on a messy corpus (issue 35): every bad row is its own error and the run goes on;
a file that cannot be read as a whole, or an output that is another run's or another process's, is
refused in one line before anything is written; pictures are read only inside ``--images``, as
regular files within ``IMM_MAX_UPLOAD_BYTES``; nothing is lost, doubled or misfiled after a kill."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

import imm
from imm import corpus
from imm.corpus import lock_output
from imm.extract import main as extract_main
from tests.conftest import jpeg_bytes
from tests.test_corpus import read_lines, write_posts

GOOD = "alice smith in paris with the knicks"


def run(argv: list, capsys) -> tuple[int, dict | None, str]:
    """The command's exit status, its summary (None when it refused) and its stderr."""
    status = extract_main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, json.loads(captured.out) if status == 0 else None, captured.err


def by_row(records: list[dict]) -> dict[int, dict]:
    return {record["row"]: record for record in records}


def test_bad_json_lines_are_their_own_rows_errors(tmp_path, models, capsys):
    lines = [
        json.dumps({"id": "a", "text": GOOD}).encode(),
        b'{"id": "b", "text": "caf\xe9 in paris"}',  # latin-1, not UTF-8
        b'{"id": "c", "text": ',  # not JSON
        b"[1, 2]",  # not an object
        b'{"id": "d", "text": "truncated tweet \\ud83d"}',  # a lone surrogate in the text
        b'{"id": "e\\ud83d", "text": "fine"}',  # ... in the id
        b'{"id": "f"}',  # no text column
        b'{"text": "no id"}',
        b'{"id": "g", "text": 5}',
        b"",  # a blank line is no row
        json.dumps({"id": "h", "text": "bob jones visited london"}).encode(),
    ]
    (tmp_path / "posts.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "answers.jsonl"
    status, summary, err = run([tmp_path / "posts.jsonl", "--out", out, "--models", models], capsys)
    assert status == 0, err
    records = read_lines(out)
    assert [r["row"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]  # 1-based, as the lines
    kinds = {r["row"]: r.get("error", {}).get("kind") for r in records}
    assert kinds == {
        1: None,
        2: "invalid_row",
        3: "invalid_row",
        4: "invalid_row",
        5: "invalid_text",
        6: "invalid_id",
        7: "invalid_text",
        8: "invalid_id",
        9: "invalid_text",
        11: None,
    }
    assert "not UTF-8" in by_row(records)[2]["error"]["message"]
    assert "lone surrogate" in by_row(records)[5]["error"]["message"]
    assert by_row(records)[6]["id"] == "e\\ud83d"  # written, escaped: the file stays UTF-8
    assert summary["rows"] == summary["written"] == 10
    with imm.load(models, intra_op_threads=1) as nlp:
        assert {k: v for k, v in by_row(records)[1].items() if k not in ("id", "row")} == nlp.ner(
            GOOD
        ).model_dump()
    # Nothing is left to do: the rerun skips every row, the bad ones included.
    status, summary, _ = run([tmp_path / "posts.jsonl", "--out", out, "--models", models, "--resume"], capsys)
    assert status == 0 and summary["skipped_already_done"] == 10 and summary["written"] == 0


def test_csv_from_excel_and_a_csv_byte_that_is_not_utf8(tmp_path, models, capsys):
    rows = [{"id": "x1", "text": GOOD}, {"id": "x2", "text": "bob in london"}]
    with open(tmp_path / "posts.csv", "w", encoding="utf-8-sig", newline="") as handle:  # with a BOM
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    with open(tmp_path / "posts.csv", "ab") as handle:
        handle.write(b"x3,caf\xe9\r\n")
    out = tmp_path / "answers.jsonl"
    status, summary, err = run([tmp_path / "posts.csv", "--out", out, "--models", models], capsys)
    assert status == 0, err
    records = read_lines(out)
    assert [r["id"] for r in records] == ["x1", "x2", "x3"]  # the id column, found through the BOM
    assert [r["row"] for r in records] == [1, 2, 3]
    assert records[2]["error"] == {"kind": "invalid_row", "message": "row 3 is not UTF-8"}
    assert summary["errors"] == {"invalid_row": 1}


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("quote.csv", b'id,text\n1,fine\n2,"unbalanced\n3,more\n', "quote.csv: row 2"),
        ("stray.csv", b'id,text\n1,"ab"c\n', "stray.csv: row 1"),
        ("truncated.parquet", None, "not a Parquet file"),
        ("text.parquet", b"id,text\n1,fine\n", "not a Parquet file"),
    ],
)
def test_a_file_that_cannot_be_read_is_refused_in_one_line_before_writing(
    tmp_path, models, capsys, name, content, says
):
    if content is None:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.table({"id": ["1", "2"], "text": [GOOD, GOOD]}), tmp_path / "whole.parquet")
        content = (tmp_path / "whole.parquet").read_bytes()[:-20]
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "answers.jsonl"
    status, _, err = run([tmp_path / name, "--out", out, "--models", models], capsys)
    assert status == 2
    assert err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not out.exists()


def test_a_row_without_the_text_column_goes_on_and_a_file_without_it_is_refused(tmp_path, models, capsys):
    (tmp_path / "posts.jsonl").write_text('{"text": "alice"}\n{"body": "x"}\n{"text": "bob"}\n')
    out = tmp_path / "a.jsonl"
    status, summary, _ = run([tmp_path / "posts.jsonl", "--out", out, "--models", models], capsys)
    assert status == 0 and summary["errors"] == {"invalid_text": 1}
    assert [r["id"] for r in read_lines(out)] == ["1", "2", "3"]  # no id column: the rows' numbers
    (tmp_path / "other.jsonl").write_text('{"body": "no text column"}\n')
    status, _, err = run(
        [tmp_path / "other.jsonl", "--out", tmp_path / "b.jsonl", "--models", models], capsys
    )
    assert status == 2 and "no 'text' column in its first row" in err
    assert not (tmp_path / "b.jsonl").exists()


@pytest.fixture()
def pictures(tmp_path) -> Path:
    """``--images``: one good picture, links out of it (to a file that exists and to one that does
    not), a FIFO, a link to /dev/zero; and a secret file beside it."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg_bytes(64, 48, seed=1))
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(64, 48, seed=2))
    (folder / "out.jpg").symlink_to(tmp_path / "secret.jpg")
    (folder / "out-missing.jpg").symlink_to(tmp_path / "nothing.jpg")
    (folder / "zero").symlink_to("/dev/zero")
    os.mkfifo(folder / "fifo")
    (folder / "large.jpg").write_bytes(jpeg_bytes(64, 48, seed=3) + b"\0" * 4096)
    return folder


def test_pictures_are_read_only_inside_images_as_regular_capped_files(
    tmp_path, models, capsys, pictures, monkeypatch
):
    monkeypatch.setenv("IMM_MAX_UPLOAD_BYTES", "4096")
    names: list = [
        "good.jpg",
        "../secret.jpg",
        "../nothing.jpg",
        str(tmp_path / "secret.jpg"),
        str(tmp_path / "nothing.jpg"),
        "out.jpg",
        "out-missing.jpg",
        "zero",
        "fifo",
        "large.jpg",
        "missing.jpg",
        5,
        ["a.jpg"],
    ]
    (tmp_path / "posts.jsonl").write_text(
        "".join(
            json.dumps({"id": str(n), "text": GOOD, "image": name}) + "\n" for n, name in enumerate(names)
        )
    )
    out = tmp_path / "a.jsonl"
    argv = [tmp_path / "posts.jsonl", "--out", out, "--models", models, "--images", pictures]
    status, _, err = run(argv, capsys)  # the "image" column is used, as "id" is: --images is given
    assert status == 0, err
    records = {r["id"]: r for r in read_lines(out)}
    errors = {
        names[int(i)] if isinstance(names[int(i)], str) else i: r.get("error") for i, r in records.items()
    }
    assert errors["good.jpg"] is None and records["0"]["image_used"] is True
    refused = [str(tmp_path / "secret.jpg"), str(tmp_path / "nothing.jpg"), "out.jpg", "out-missing.jpg"]
    for name in ["../secret.jpg", "../nothing.jpg", *refused, "zero"]:
        # The same error whether the file exists or not: nothing is told of files outside.
        assert errors[name] == {
            "kind": "invalid_image",
            "message": f"{name!r} is not a path inside --images (not read)",
        }
    assert errors["fifo"] == {"kind": "invalid_image", "message": "fifo: the file is not a regular file"}
    assert (
        errors["large.jpg"]["kind"] == "InputTooLarge"
        and "IMM_MAX_UPLOAD_BYTES" in errors["large.jpg"]["message"]
    )
    assert errors["missing.jpg"]["kind"] == "image_missing"
    assert errors["11"]["kind"] == errors["12"]["kind"] == "invalid_image"


def test_an_image_column_without_images_is_named_in_a_note(tmp_path, models, capsys):
    (tmp_path / "posts.jsonl").write_text(json.dumps({"id": "a", "text": GOOD, "image": "a.jpg"}) + "\n")
    argv = [tmp_path / "posts.jsonl", "--out", tmp_path / "a.jsonl", "--models", models]
    status, summary, err = run(argv, capsys)
    assert status == 0 and "the 'image' column is ignored: give --images DIR" in err
    assert summary["notes"] == ["the 'image' column is ignored: give --images DIR to read its pictures"]
    status, _, err = run([*argv[:-2], "--out", tmp_path / "b.jsonl", "--image-column", "image"], capsys)
    assert status == 2 and "--image-column needs --images" in err


def test_a_text_past_the_limit_is_its_rows_error_and_never_tokenised(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setenv("IMM_MAX_TEXT_CHARS", "1000")
    tokenised: list[str] = []
    real_piece_counts = imm.AsyncIMM.piece_counts

    def piece_counts_seen(self, texts):
        tokenised.extend(texts)
        return real_piece_counts(self, texts)

    monkeypatch.setattr(imm.AsyncIMM, "piece_counts", piece_counts_seen)
    long_text = "word " * 100_000
    (tmp_path / "posts.jsonl").write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in [GOOD, long_text, "bob in london"])
    )
    out = tmp_path / "a.jsonl"
    status, summary, _ = run([tmp_path / "posts.jsonl", "--out", out, "--models", models], capsys)
    assert status == 0 and summary["errors"] == {"InputTooLarge": 1}
    assert (
        read_lines(out)[1]["error"]["message"]
        == "text is 500000 characters long, more than the limit of 1000"
    )
    assert long_text not in tokenised and GOOD in tokenised


def kill_mid_write(out: Path, complete_lines: int) -> None:
    """What a SIGKILL leaves: the first ``complete_lines`` rows and half of the next line."""
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:complete_lines]) + lines[complete_lines][:10])


def test_duplicate_ids_resume_by_position(tmp_path, models, capsys):
    posts = tmp_path / "posts.jsonl"
    texts = [GOOD, "bob jones visited london", "carol at tokyo", "dave", "eve in rome", "frank"]
    ids: list = [1, "1", 1, "x", "x", 2]  # 1 and "1" are one id once written
    posts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    clean, resumed = tmp_path / "clean.jsonl", tmp_path / "resumed.jsonl"
    assert run([posts, "--out", clean, "--models", models], capsys)[0] == 0
    assert run([posts, "--out", resumed, "--models", models], capsys)[0] == 0
    kill_mid_write(resumed, 2)
    status, summary, _ = run([posts, "--out", resumed, "--models", models, "--resume"], capsys)
    assert status == 0 and summary["skipped_already_done"] == 2 and summary["written"] == 4
    assert read_lines(resumed) == read_lines(clean)  # every row once, in order


def test_resume_refuses_another_input_task_or_models(tmp_path, models, bundles, capsys):
    posts = tmp_path / "posts.jsonl"
    write_posts(posts, 5)
    out = tmp_path / "a.jsonl"
    argv = [posts, "--out", out, "--models", models]
    assert run(argv, capsys)[0] == 0
    kill_mid_write(out, 3)
    before = out.read_bytes()
    status, _, err = run([*argv, "--resume", "--task", "extract"], capsys)
    assert status == 2 and err.count("\n") == 1 and "its task was 'ner', now 'extract'" in err
    # A row inserted in an input without ids: the rows' numbers would name other rows.
    posts.write_text('{"id": "new", "text": "inserted"}\n' + posts.read_text())
    status, _, err = run([*argv, "--resume"], capsys)
    assert status == 2 and "its input_sha256 was" in err
    assert out.read_bytes() == before  # nothing written, nothing cut


def test_a_second_process_on_the_same_out_is_refused(tmp_path, models, capsys):
    posts = tmp_path / "posts.jsonl"
    write_posts(posts, 3)
    out = tmp_path / "a.jsonl"
    held = lock_output(out)  # what a running imm extract holds (flock: per open file, so per process)
    try:
        status, _, err = run([posts, "--out", out, "--models", models, "--resume"], capsys)
        assert status == 2 and err.count("\n") == 1 and "being written by another imm extract" in err
        assert not out.exists()
    finally:
        held.close()
    assert run([posts, "--out", out, "--models", models], capsys)[0] == 0  # released: it runs


def test_a_removed_parquet_part_is_answered_again_and_no_part_overwritten(
    tmp_path, models, capsys, monkeypatch
):
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(corpus, "PARQUET_ROWS_PER_PART", 4)
    posts = tmp_path / "posts.jsonl"
    rows = write_posts(posts, 12)
    out = tmp_path / "a.parquet"
    argv = [posts, "--out", out, "--models", models, "--sort-window", 4]  # a window is written at once
    assert run(argv, capsys)[0] == 0
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]
    kept = {
        name: pq.read_table(out / name).to_pylist() for name in ("part-00000.parquet", "part-00002.parquet")
    }
    (out / "part-00001.parquet").unlink()
    status, summary, _ = run([*argv, "--resume"], capsys)
    assert status == 0 and summary["written"] == 4 and summary["skipped_already_done"] == 8
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.parquet" for i in (0, 2, 3)]
    for name, table in kept.items():
        assert pq.read_table(out / name).to_pylist() == table
    got = pq.read_table(out).to_pylist()
    assert sorted(r["row"] for r in got) == list(range(1, 13))
    assert {r["id"] for r in got} == {r["id"] for r in rows}
