"""``imm extract``: a corpus answered row by row as the API answers, every row once, after any kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imm
from imm.extract import main as extract_main
from tests.conftest import jpeg_bytes, synthetic_ner_examples

ROOT = Path(__file__).resolve().parents[1]


def write_posts(path: Path, count: int, seed: int = 0, pictures: Path | None = None) -> list[dict]:
    """``count`` tweets of the synthetic NER set as JSON lines (ids "p0", ...); with ``pictures``,
    every third row names a picture there (every ninth a missing one)."""
    rows = []
    for number, example in enumerate(synthetic_ner_examples(count, seed=seed)):
        row = {"id": f"p{number}", "text": " ".join(example.words)}
        if pictures is not None and number % 3 == 0:
            name = f"{number}.jpg"
            if number % 9:
                (pictures / name).write_bytes(jpeg_bytes(64, 48, seed=number))
            row["image"] = name
        rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def written(path: Path) -> int:
    """Bytes written so far to a JSON lines file or a directory of Parquet parts, in rows' stead."""
    if path.is_dir():
        return sum(_size(part) for part in path.glob("*")) // 100
    return _size(path) // 100


def _size(path: Path) -> int:
    """0 for a file gone since it was listed: a temporary part renamed by the command meanwhile."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_row_gets_the_apis_answer_or_its_own_error(tmp_path, models, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rows = write_posts(tmp_path / "posts.jsonl", 30, pictures=pictures)
    rows.append({"id": "blank", "text": "   "})
    (tmp_path / "posts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    argv = [str(tmp_path / "posts.jsonl"), "--out", str(out), "--models", str(models), "--id-column", "id"]
    # Windows of 7 rows, each sent shortest first: the output is still in input order.
    argv += ["--sort-window", "7", "--task", "extract", "--images", str(pictures), "--image-column", "image"]
    assert extract_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == summary["written"] == 31
    assert summary["errors"] == {"image_missing": 4, "invalid_text": 1}
    answers = read_lines(out)
    assert [a["id"] for a in answers] == [r["id"] for r in rows]  # in input order
    with imm.load(models, intra_op_threads=1) as nlp:
        for row, got in zip(rows, answers):
            if "error" in got:
                continue
            picture = (pictures / row["image"]).read_bytes() if "image" in row else None
            assert {k: v for k, v in got.items() if k not in ("id", "row")} == nlp.extract(
                row["text"], picture
            ).model_dump()


def test_csv_in_parquet_out_and_a_second_run_needs_resume(tmp_path, models, capsys):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    rows = write_posts(tmp_path / "posts.jsonl", 12)
    with open(tmp_path / "posts.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "answers.parquet"
    argv = [str(tmp_path / "posts.csv"), "--out", str(out), "--models", str(models), "--id-column", "id"]
    assert extract_main(argv) == 0
    table = pyarrow_parquet.read_table(out).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert all(json.loads(r["answer"])["model"] for r in table)
    capsys.readouterr()
    assert extract_main(argv) == 2
    assert "add --resume" in capsys.readouterr().err
    assert extract_main([*argv, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_already_done"] == 12


def test_bad_input_is_one_line(tmp_path, models, capsys):
    argv = ["--out", str(tmp_path / "a.jsonl"), "--models", str(models)]
    assert extract_main([str(tmp_path / "posts.txt"), *argv]) == 2
    assert "unknown format" in capsys.readouterr().err
    (tmp_path / "other.jsonl").write_text('{"body": "no text column"}\n')
    assert extract_main([str(tmp_path / "other.jsonl"), *argv]) == 2
    err = capsys.readouterr().err
    assert "no 'text' column" in err and err.count("\n") == 1
    (tmp_path / "ids.jsonl").write_text('{"text": "fine"}\n')
    assert extract_main([str(tmp_path / "ids.jsonl"), *argv, "--id-column", "key"]) == 2
    assert "no 'key' column in its first row" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_an_id_column_is_used_without_being_named(tmp_path, models, capsys):
    rows = write_posts(tmp_path / "posts.jsonl", 3)
    assert (
        extract_main(
            [str(tmp_path / "posts.jsonl"), "--out", str(tmp_path / "a.jsonl"), "--models", str(models)]
        )
        == 0
    )
    assert [a["id"] for a in read_lines(tmp_path / "a.jsonl")] == [r["id"] for r in rows]  # "p0", ...
    (tmp_path / "bare.jsonl").write_text('{"text": "alice in paris"}\n{"text": "bob"}\n')
    assert (
        extract_main(
            [str(tmp_path / "bare.jsonl"), "--out", str(tmp_path / "b.jsonl"), "--models", str(models)]
        )
        == 0
    )
    assert [a["id"] for a in read_lines(tmp_path / "b.jsonl")] == ["1", "2"]  # the rows' numbers


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_kill_at_any_moment_loses_no_row_and_duplicates_none(tmp_path, models, suffix):
    """Real SIGKILLs while the command writes, then --resume until it finishes: each row once, and
    the same answers as a run that was never killed."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    rows = write_posts(tmp_path / "posts.jsonl", 3000, seed=4)
    clean, resumed = tmp_path / f"clean{suffix}", tmp_path / f"resumed{suffix}"
    command = [
        sys.executable,
        "-m",
        "imm.cli",
        "extract",
        str(tmp_path / "posts.jsonl"),
        "--models",
        str(models),
    ]
    command += ["--id-column", "id", "--concurrency", "8"]
    env = {**os.environ, "IMM_INTRA_OP_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([*command, "--out", str(clean)], check=True, env=env, capture_output=True, timeout=600)
    kills = 0
    for _ in range(3):
        process = subprocess.Popen([*command, "--out", str(resumed), "--resume"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        before = written(resumed)
        while process.poll() is None and written(resumed) < before + 100:
            time.sleep(0.002)  # rows are being written: kill it in the middle of that
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(60)
    subprocess.run(
        [*command, "--out", str(resumed), "--resume"], check=True, env=env, capture_output=True, timeout=600
    )
    assert kills >= 1
    if suffix == ".jsonl":
        got, expected = read_lines(resumed), read_lines(clean)
    else:
        import pyarrow.parquet as pq

        got, expected = pq.read_table(resumed).to_pylist(), pq.read_table(clean).to_pylist()
    ids = [record["id"] for record in got]
    assert len(ids) == len(set(ids)) == len(rows)
    assert sorted(got, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
