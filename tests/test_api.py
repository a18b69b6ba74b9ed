"""The Python API (``import imm``) and the ``imm`` command: the server's answers, without HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import imm
from imm.api import shortest_first
from imm.cli import main as imm_main
from tests.conftest import jpeg_bytes
from tests.test_service import ServerThread, make_settings

TEXTS = ["alice smith in paris with the knicks", "bob jones visited london", "nothing here"]


@pytest.fixture(scope="module")
def nlp(bundles):
    with imm.load(ner=bundles["ner"], re=bundles["re"], intra_op_threads=1) as loaded:
        yield loaded


def test_answers_equal_the_servers(bundles, nlp, tmp_path):
    """The same typed answers as the HTTP API's JSON: /ner (with a picture, given as a path), /re,
    /extract."""
    from service import create_app

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(200, 150, seed=3))
    with ServerThread(create_app(make_settings(bundles))) as url:
        import httpx

        with httpx.Client(base_url=url, timeout=60) as http:
            for text in TEXTS:
                served = http.post("/ner", data={"text": text}, files={"image": photo.read_bytes()}).json()
                assert nlp.ner(text, image=photo).model_dump() == served
                served = http.post("/extract", data={"text": text}).json()
                assert nlp.extract(text).model_dump() == served
            pair = {"head_start": 0, "head_end": 11, "tail_start": 15, "tail_end": 20}
            served = http.post("/re", data={"text": TEXTS[0], **pair}).json()
            assert nlp.re(TEXTS[0], head=(0, 11), tail=(15, 20)).model_dump() == served


def test_pipe_answers_in_order_as_one_at_a_time(nlp):
    items = TEXTS * 7
    assert [a.model_dump() for a in nlp.pipe(items, "ner", batch_size=8)] == [
        nlp.ner(t).model_dump() for t in items
    ]
    pairs = [{"text": TEXTS[0], "head": (0, 11), "tail": (15, 20)}] * 3
    assert len({a.relation for a in nlp.pipe(pairs, task="re")}) == 1
    with pytest.raises(imm.PipeError, match="^item 0: an item of pipe.. is a text or a dict") as caught:
        list(nlp.pipe([42]))
    assert isinstance(caught.value.error, TypeError)


def test_many_texts_go_fewest_pieces_first(nlp):
    texts = ["bob jones visited london and paris", "nothing", None, "alice smith"]
    counts = nlp.piece_counts([t for t in texts if t is not None])
    assert counts[0] > counts[2] > counts[1] > 0  # the models' tokenizer, in word pieces
    # A text the call will refuse (not a string) goes first; then fewest pieces first.
    assert shortest_first(nlp._async, texts) == [2, 1, 3, 0]


def test_errors_are_the_engines_own(nlp):
    with pytest.raises(imm.InvalidInput) as caught:
        nlp.ner("   ")
    assert caught.value.field == "text"
    with pytest.raises(imm.ImageError):
        nlp.ner(TEXTS[0], image=b"not a picture")
    with pytest.raises(imm.InvalidInput):
        nlp.re(TEXTS[0], head=(0, 3), tail=(15, 20))  # cuts a word


def test_the_async_api_runs_on_the_callers_loop(bundles, nlp):
    async def scenario() -> list[dict]:
        async with await imm.load_async(ner=bundles["ner"], re="", intra_op_threads=1) as only_ner:
            assert only_ner.tasks == ["ner"]
            answers = [a.model_dump() async for a in only_ner.pipe(TEXTS, batch_size=2)]
            with pytest.raises(imm.ModelUnavailable, match="RE model"):
                await only_ner.re(TEXTS[0], (0, 11), (15, 20))
            return answers

    assert asyncio.run(scenario()) == [nlp.ner(text).model_dump() for text in TEXTS]


def test_load_names_what_is_missing(tmp_path, bundles):
    with pytest.raises(imm.ModelUnavailable, match="no such directory"):
        imm.load(tmp_path / "nowhere")
    with pytest.raises(imm.ModelUnavailable, match="holds no bundle"):
        imm.load(tmp_path)
    one = imm.load(bundles["re"], intra_op_threads=1)  # one bundle directory: its manifest's task
    try:
        assert one.tasks == ["re"]
    finally:
        one.close()


# --- the command ----------------------------------------------------------------------------------


def test_the_command_lists_its_subcommands_and_refuses_unknown_ones(capsys):
    assert imm_main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("serve", "train", "evaluate", "export", "extract"))
    assert imm_main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "train", "evaluate", "export", "extract"])
def test_every_subcommand_has_help_and_starts_nothing(command, capsys):
    with pytest.raises(SystemExit) as exited:
        imm_main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: imm {command}" in capsys.readouterr().out


def test_serve_help_lists_every_setting():
    from engine.settings import Settings

    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert all(f"IMM_{name.upper()}" in result.stdout for name in Settings.model_fields)


def test_settings_come_from_a_dot_env_file_and_the_environment_wins(tmp_path, monkeypatch):
    from engine.settings import Settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("IMM_MAX_BATCH_SIZE=7\nIMM_PORT=9001\n")
    monkeypatch.setenv("IMM_PORT", "9002")
    settings = Settings()
    assert (settings.max_batch_size, settings.port) == (7, 9002)


def test_evaluating_a_bundle_with_model_evaluate_says_where_in_one_line(capsys, tmp_path):
    from model.evaluate import main as evaluate_checkpoint

    assert evaluate_checkpoint(["--bundle", str(tmp_path), "--data", str(tmp_path / "x.txt")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "imm evaluate --bundle" in error


def test_an_mnre_line_that_does_not_parse_says_what_was_expected(tmp_path):
    from model.data import DataFormatError, read_mnre

    conll = tmp_path / "train.txt"
    conll.write_text("IMGID:1\nEU\tB-ORG\nrejects\tO\n")
    with pytest.raises(DataFormatError) as caught:
        read_mnre(conll)
    message = str(caught.value)
    assert message.startswith(f"{conll}:1: expected one MNRE record per line")
    assert "CoNLL" in message


def test_training_logs_json_lines_when_asked(tmp_path, tiny_backbone):
    import json

    from tests.conftest import synthetic_ner_examples
    from tests.test_train import write_conll

    data = write_conll(tmp_path / "train.txt", synthetic_ner_examples(8, seed=1))
    result = subprocess.run(
        [sys.executable, "-m", "imm.cli", "train", "--task", "ner", "--train", str(data), "--dev", str(data),
         "--backbone", str(tiny_backbone), "--epochs", "1", "--out", str(tmp_path / "run"), "--log-format", "json"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines and all(json.loads(line)["level"] in ("info", "warning") for line in lines)
    assert any("epoch" in json.loads(line).get("message", "") for line in lines)
