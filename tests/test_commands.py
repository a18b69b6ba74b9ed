"""Issue 36, the commands: ``imm serve`` options over the environment over ``.env``, ``--version``,
``--help`` with every default and whole descriptions, ``imm evaluate --checkpoint | --bundle``,
unknown ``IMM_*`` names warned about, ``.env`` ignored by git, one-line errors."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.settings import Settings, unknown_variables
from imm.cli import main as imm_main
from tests.test_server import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction)


def parsers() -> dict[str, argparse.ArgumentParser]:
    from export.__main__ import build_parser as export
    from export.evaluate import build_parser as evaluate_bundle
    from imm.extract import build_parser as extract
    from model.distill import build_parser as distill
    from model.evaluate import build_parser as evaluate
    from model.train import build_parser as train
    from service.__main__ import build_parser as serve

    return {
        "imm serve": serve("imm serve"),
        "imm train": train("imm train"),
        "imm evaluate": evaluate("imm evaluate", bundles=True),
        "python -m model.evaluate": evaluate(),
        "python -m model.distill": distill(),
        "python -m export.evaluate": evaluate_bundle(),
        "imm export": export("imm export"),
        "imm extract": extract("imm extract"),
    }


@pytest.mark.parametrize("command", sorted(parsers()))
def test_help_shows_every_default(command):
    parser = parsers()[command]
    for action in parser._actions:
        if action.default is None or action.required or isinstance(action, FLAGS):
            continue
        entry = " ".join(parser._get_formatter()._format_action(action).split())  # as --help prints it
        assert re.search(r"\(default\b", entry), (command, entry)


@pytest.mark.parametrize("command", sorted(parsers()))
def test_descriptions_are_whole_sentences(command):
    description = " ".join(parsers()[command].description.split())
    assert description.count("(") == description.count(")"), description
    assert description[-1] in ".)", description  # not cut mid-sentence, as "... (or" was


def test_train_help_shows_the_defaults_the_training_doc_points_to():
    done = subprocess.run(
        [sys.executable, "-m", "model.train", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    text = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stderr
    for default in ("--epochs EPOCHS passes over the training data (default: 10)", "(default: 5e-05)"):
        assert default in text


def test_imm_evaluate_help_offers_checkpoint_or_bundle(capsys):
    with pytest.raises(SystemExit) as exit:
        imm_main(["evaluate", "--help"])
    assert exit.value.code == 0
    assert "(--checkpoint CHECKPOINT | --bundle BUNDLE)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x.txt"], "one of the arguments --checkpoint --bundle is required"),
        (["--checkpoint", "a", "--bundle", "b", "--data", "x.txt"], "not allowed with argument"),
    ],
)
def test_imm_evaluate_needs_exactly_one_of_checkpoint_and_bundle(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        imm_main(["evaluate", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_imm_version_and_python_m_imm(capsys):
    import imm

    assert imm_main(["--version"]) == 0
    assert capsys.readouterr().out == f"imm {imm.__version__}\n"
    done = subprocess.run(
        [sys.executable, "-m", "imm", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0 and "usage: python -m imm COMMAND" in done.stdout
    assert all(command in done.stdout for command in ("serve", "train", "evaluate", "export", "extract"))


def test_a_training_command_without_torch_says_which_extra_in_one_line():
    """The plain install has no PyTorch: ``imm train`` says what to install, not a traceback."""
    script = "import sys; sys.modules['torch'] = None; from imm.cli import main; sys.exit(main(['train', '--help']))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 2
    assert (
        done.stderr
        == "error: imm train needs torch, of the train extra: pip install 'implicit-modality-mining[train]'\n"
    )


def test_serve_options_win_over_the_environment_which_wins_over_dot_env(tmp_path, monkeypatch):
    from service.__main__ import OPTIONS, apply_options, build_parser

    for setting in OPTIONS.values():  # apply_options writes them: monkeypatch restores them after
        monkeypatch.setenv(f"IMM_{setting.upper()}", "")
        monkeypatch.delenv(f"IMM_{setting.upper()}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("IMM_PORT=9001\nIMM_HOST=10.0.0.1\nIMM_WORKERS=3\n")
    environ = {"IMM_PORT": "9002", "IMM_HOST": "10.0.0.2"}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    given = apply_options(build_parser().parse_args(["--port", "9003", "--re", "off"]), os.environ)
    settings = Settings()
    assert (settings.port, settings.host, settings.workers, settings.re_bundle) == (9003, "10.0.0.2", 3, None)
    assert given == {"port": "--port", "re_bundle": "--re"}


def test_an_invalid_option_value_is_one_line_naming_the_option():
    done = subprocess.run(
        [sys.executable, "-m", "service", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert (
        done.stderr == "error: invalid configuration: --port: Input should be less than or equal to 65535\n"
    )


def test_unknown_imm_names_are_warned_about_with_the_likely_setting(tmp_path):
    dot_env = tmp_path / ".env"
    dot_env.write_text("IMM_PROT=8001\nIMM_API_KEY=secret\n")
    environ = {
        "IMM_MAX_BATCH_SZE": "4",  # the misspelling
        "imm_port": "8000",  # pydantic-settings matches names in any case: a setting
        "IMM_RAY_MIN_REPLICAS": "2",  # read by service.ray_app, which checks its own
        "IMM_HEALTHCHECK_TIMEOUT": "3",  # read by the Docker health check
        "IMM_COMPLETELY_UNRELATED": "1",
        "PATH": "/usr/bin",
    }
    assert unknown_variables(environ, dot_env) == [
        "IMM_COMPLETELY_UNRELATED (environment) is not a setting and is ignored: "
        "python -m service --help lists the settings",
        "IMM_MAX_BATCH_SZE (environment) is not a setting and is ignored: did you mean IMM_MAX_BATCH_SIZE?",
        f"IMM_PROT ({dot_env}) is not a setting and is ignored: did you mean IMM_PORT?",
    ]


def test_imm_serve_listens_where_its_options_say_and_warns_about_unknown_names(tmp_path):
    """The issue's ``imm serve --port 18902`` (on a free port), with a misspelt setting in .env and
    another port in the environment: the option wins, the misspelling is named at start-up."""
    port = free_port()
    (tmp_path / ".env").write_text("IMM_MAX_BATCH_SZE=4\nIMM_WARMUP=false\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("IMM_", "PROMETHEUS_"))}
    env |= {"IMM_PORT": str(free_port()), "IMM_INTRA_OP_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "imm", "serve", "--port", str(port), "--host", "127.0.0.1", "--re", ""],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-4000:]

    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, output)
        answer = httpx.post(f"{url}/ner", data={"text": "Alice Smith is in Paris"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert [entity["text"] for entity in answer.json()["entities"]] == ["Alice Smith", "Paris"]
        assert httpx.get(f"{url}/ready", timeout=10).json()["models"]["re"]["status"] != "ready"
        assert (
            "IMM_MAX_BATCH_SZE (.env) is not a setting and is ignored: did you mean IMM_MAX_BATCH_SIZE?"
            in output()
        )
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_dot_env_is_ignored_by_git():
    """An IMM_API_KEY in .env must not be committed by accident."""
    done = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert done.returncode == 0
