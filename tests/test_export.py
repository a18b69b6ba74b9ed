"""Export to ONNX bundles: parity with PyTorch, int8 agreement, numpy Viterbi, tampering, the CLI.

Each precision is exported once per module from the small trained checkpoints of conftest, and
checked on a fixture set of 104 held-out synthetic tweets, half of them with an image, at batch
sizes 1 and 8 (mixed lengths, mixed image and text-only rows in one batch).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchcrf import CRF

from export.__main__ import main as export_main
from export.bundle import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, BundleError, load_bundle, sha256_file
from export.onnx_export import INPUT_NAMES, OUTPUT_NAMES, export_bundle
from imm.cli import main as imm_main
from model.checkpoint import load_checkpoint, resolve_checkpoint
from model.decoding import viterbi_decode
from tests.conftest import jpeg_bytes, synthetic_ner_examples, synthetic_re_examples
from tests.test_train import write_conll, write_mnre

FIXTURE_SIZE = 104
ROOT = Path(__file__).resolve().parents[1]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ner_model(trained_ner_checkpoint):
    model, preprocessor = load_checkpoint(trained_ner_checkpoint)
    return model.eval(), preprocessor


@pytest.fixture(scope="module")
def re_model(trained_re_checkpoint):
    model, preprocessor = load_checkpoint(trained_re_checkpoint)
    return model.eval(), preprocessor


def _images(preprocessor, count: int) -> list[np.ndarray | None]:
    """A picture (of varying size) for every other example, none for the rest."""
    return [
        preprocessor.image(jpeg_bytes(width=48 + 8 * (i % 5), height=40 + 4 * (i % 3), seed=i))
        if i % 2 == 0
        else None
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def ner_fixture_set(ner_model):
    """Held-out examples (another seed than training), encoded, with their images."""
    _, preprocessor = ner_model
    examples = synthetic_ner_examples(FIXTURE_SIZE, seed=7)
    return [preprocessor.text.encode(e.words) for e in examples], _images(preprocessor, FIXTURE_SIZE)


@pytest.fixture(scope="module")
def re_fixture_set(re_model):
    _, preprocessor = re_model
    examples = synthetic_re_examples(FIXTURE_SIZE, seed=7)
    texts = [preprocessor.text.encode_relation(e.words, e.head, e.tail) for e in examples]
    return texts, _images(preprocessor, FIXTURE_SIZE)


def batches(preprocessor, fixture_set, batch_size: int) -> list[dict[str, np.ndarray]]:
    texts, images = fixture_set
    return [
        preprocessor.collate(texts[start : start + batch_size], images[start : start + batch_size])
        for start in range(0, len(texts), batch_size)
    ]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, trained_ner_checkpoint, trained_re_checkpoint):
    """One export per precision (NER), the fp32 one with a Triton repository, and an fp32 RE bundle."""
    root = tmp_path_factory.mktemp("bundles")
    made = {
        "ner-fp32": export_bundle(
            trained_ner_checkpoint, root / "ner-fp32", "fp32", triton_dir=root / "triton", name="imm-ner"
        ),
        "ner-int8": export_bundle(trained_ner_checkpoint, root / "ner-int8", "int8"),
        "ner-fp16": export_bundle(trained_ner_checkpoint, root / "ner-fp16", "fp16"),
        "re-fp32": export_bundle(trained_re_checkpoint, root / "re-fp32", "fp32"),
    }
    made["triton"] = root / "triton"
    return made


def session(bundle) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle.model_path), options, providers=["CPUExecutionProvider"])


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in batch.items()}


def decode(bundle, emissions: np.ndarray, word_mask: np.ndarray) -> list[list[str]]:
    crf = bundle.crf
    ids = viterbi_decode(
        emissions, word_mask, crf["transitions"], crf["start_transitions"], crf["end_transitions"]
    )
    return [[bundle.labels[i] for i in row] for row in ids]


# --- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 8])
def test_ner_fp32_matches_pytorch(bundles, ner_model, ner_fixture_set, batch_size):
    model, preprocessor = ner_model
    bundle = load_bundle(bundles["ner-fp32"])
    runner = session(bundle)
    assert bundle.input_names == list(INPUT_NAMES["ner"])
    worst, compared, mixed = 0.0, 0, 0
    for batch in batches(preprocessor, ner_fixture_set, batch_size):
        (emissions,) = runner.run(["emissions"], {name: batch[name] for name in bundle.input_names})
        with torch.no_grad():
            expected = model(**torch_batch(batch)).logits.numpy()
            expected_tags = model.predict(**torch_batch(batch))
        assert emissions.shape == expected.shape
        worst = max(worst, float(np.abs(emissions - expected).max()))
        assert decode(bundle, emissions, batch["word_mask"]) == expected_tags
        compared += len(expected_tags)
        mixed += int(0 < batch["has_image"].sum() < len(batch["has_image"]))
    assert worst <= 1e-4, f"max abs difference {worst:.3g}"
    assert compared == FIXTURE_SIZE
    assert batch_size == 1 or mixed > 0  # batches mix image and text-only rows


@pytest.mark.parametrize("batch_size", [1, 8])
def test_re_fp32_matches_pytorch(bundles, re_model, re_fixture_set, batch_size):
    model, preprocessor = re_model
    bundle = load_bundle(bundles["re-fp32"])
    runner = session(bundle)
    # re_pooling="cls" leaves marker_index unused; the graph keeps it for a stable signature.
    assert bundle.input_names == list(INPUT_NAMES["re"])
    assert bundle.output_names == list(OUTPUT_NAMES["re"]) and bundle.crf is None
    for batch in batches(preprocessor, re_fixture_set, batch_size):
        (logits,) = runner.run(["logits"], {name: batch[name] for name in bundle.input_names})
        with torch.no_grad():
            expected = model(**torch_batch(batch)).logits.numpy()
            expected_labels = model.predict(**torch_batch(batch))
        assert np.abs(logits - expected).max() <= 1e-4
        assert [bundle.labels[i] for i in logits.argmax(-1)] == expected_labels


def test_ner_int8_keeps_the_labels(bundles, ner_model, ner_fixture_set):
    model, preprocessor = ner_model
    fp32, int8 = load_bundle(bundles["ner-fp32"]), load_bundle(bundles["ner-int8"])
    assert int8.precision == "int8"
    assert int8.model_path.stat().st_size < 0.5 * fp32.model_path.stat().st_size
    runner = session(int8)
    same = total = 0
    for batch in batches(preprocessor, ner_fixture_set, 8):
        (emissions,) = runner.run(["emissions"], {name: batch[name] for name in int8.input_names})
        expected = model.predict(**torch_batch(batch))
        for ours, theirs in zip(decode(int8, emissions, batch["word_mask"]), expected):
            same += sum(a == b for a, b in zip(ours, theirs))
            total += len(theirs)
    assert same / total >= 0.98, f"int8 keeps {same / total:.2%} of {total} word labels"


def test_ner_fp16_stays_close(bundles, ner_model, ner_fixture_set):
    model, preprocessor = ner_model
    bundle = load_bundle(bundles["ner-fp16"])
    assert {i["name"]: i["dtype"] for i in bundle.manifest["inputs"]}[
        "pixel_values"
    ] == "float32"  # io stays fp32
    runner = session(bundle)
    batch = batches(preprocessor, ner_fixture_set, 8)[0]
    (emissions,) = runner.run(["emissions"], {name: batch[name] for name in bundle.input_names})
    expected = model(**torch_batch(batch)).logits.detach().numpy()
    assert emissions.dtype == np.float32
    assert np.abs(emissions - expected).max() <= 2e-2 * max(1.0, np.abs(expected).max())


def test_manifest_records_the_checkpoint(bundles, trained_ner_checkpoint):
    model, _ = load_checkpoint(trained_ner_checkpoint)
    bundle = load_bundle(bundles["ner-fp32"])
    manifest = bundle.manifest
    assert bundle.task == "ner" and bundle.labels == model.config.labels
    assert bundle.preprocessing == model.config.preprocessing
    assert manifest["scores"] == {"f1": 1.0} and manifest["opset"] == 17
    np.testing.assert_array_equal(bundle.crf["transitions"], model.head.crf.transitions.detach().numpy())
    np.testing.assert_array_equal(
        bundle.crf["end_transitions"], model.head.crf.end_transitions.detach().numpy()
    )
    assert manifest["parity"]["max_abs"] <= 1e-4
    assert set(manifest["files"]) == {MODEL_FILE, TOKENIZER_FILE}
    assert bundle.name == f"imm-ner@{sha256_file(bundle.model_path)[:12]}"
    checkpoint_files = resolve_checkpoint(trained_ner_checkpoint)
    assert bundle.tokenizer_path.read_bytes() == (checkpoint_files / TOKENIZER_FILE).read_bytes()


# --- numpy Viterbi ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tags", [1, 3, 9])
def test_numpy_viterbi_equals_pytorch_crf(num_tags):
    generator = torch.Generator().manual_seed(num_tags)
    crf = CRF(num_tags, batch_first=True)
    with torch.no_grad():
        for parameter in (crf.transitions, crf.start_transitions, crf.end_transitions):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2)
    for trial in range(20):
        batch, words = 1 + trial % 7, 1 + (3 * trial) % 13
        emissions = torch.randn(batch, words, num_tags, generator=generator) * (1 + trial % 3)
        lengths = torch.randint(1, words + 1, (batch,), generator=generator)
        lengths[0] = words  # pytorch-crf wants one full-length row with batch_first masks
        mask = torch.arange(words)[None] < lengths[:, None]
        expected = crf.decode(emissions, mask=mask)
        ours = viterbi_decode(
            emissions.numpy(),
            mask.numpy(),
            crf.transitions.detach().numpy(),
            crf.start_transitions.detach().numpy(),
            crf.end_transitions.detach().numpy(),
        )
        assert ours == expected


# --- tampering ----------------------------------------------------------------------------------


@pytest.fixture()
def bundle_copy(bundles, tmp_path) -> Path:
    return Path(shutil.copytree(bundles["ner-fp32"], tmp_path / "bundle"))


def test_a_modified_model_file_is_refused(bundle_copy):
    load_bundle(bundle_copy)  # intact: loads
    data = bytearray((bundle_copy / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its manifest"):
        load_bundle(bundle_copy)


def test_an_edited_manifest_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    manifest["labels"][1], manifest["labels"][3] = manifest["labels"][3], manifest["labels"][1]
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edited after export"):
        load_bundle(bundle_copy)


def test_a_missing_or_replaced_file_is_refused(bundle_copy):
    (bundle_copy / TOKENIZER_FILE).write_text("{}")
    with pytest.raises(BundleError, match=r"tokenizer\.json does not match"):
        load_bundle(bundle_copy)
    (bundle_copy / TOKENIZER_FILE).unlink()
    with pytest.raises(BundleError, match=r"missing tokenizer\.json"):
        load_bundle(bundle_copy)
    (bundle_copy / MANIFEST_FILE).write_text("not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(bundle_copy)


def test_a_bundle_serves_without_torch(bundles, ner_model, ner_fixture_set):
    """The server's path: load_bundle, ONNX Runtime and numpy decoding, with torch never imported."""
    model, preprocessor = ner_model
    batch = batches(preprocessor, ner_fixture_set, 8)[1]
    expected = model.predict(**torch_batch(batch))
    script = f"""
import sys, numpy as np, onnxruntime as ort
from export.bundle import load_bundle
from model.decoding import viterbi_decode
from model.preprocessing import Preprocessor
bundle = load_bundle({str(bundles["ner-fp32"])!r})
Preprocessor.from_directory(bundle.directory, bundle.preprocessing)
batch = dict(np.load(sys.argv[1]))
(emissions,) = ort.InferenceSession(str(bundle.model_path)).run(None, {{n: batch[n] for n in bundle.input_names}})
crf = bundle.crf
tags = viterbi_decode(emissions, batch["word_mask"], crf["transitions"], crf["start_transitions"], crf["end_transitions"])
print([[bundle.labels[t] for t in row] for row in tags])
assert "torch" not in sys.modules, "torch was imported"
"""
    path = Path(bundles["ner-fp32"]).parent / "batch.npz"
    np.savez(path, **batch)
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


# --- Triton -------------------------------------------------------------------------------------


def test_triton_repository(bundles):
    model_dir = bundles["triton"] / "imm-ner"
    config = (model_dir / "config.pbtxt").read_text()
    assert 'name: "imm-ner"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 0" in config and "dynamic_batching" not in config
    for name in (*INPUT_NAMES["ner"], "emissions"):
        assert f'name: "{name}"' in config
    assert "dims: [ -1, 3, 224, 224 ]" in config and "dims: [ -1, -1 ]" in config
    assert sha256_file(model_dir / "1" / MODEL_FILE) == sha256_file(bundles["ner-fp32"] / MODEL_FILE)
    assert (model_dir / MANIFEST_FILE).is_file() and (model_dir / TOKENIZER_FILE).is_file()


# --- the CLI ------------------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = export_main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture()
def broken_checkpoints(trained_ner_checkpoint, tmp_path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer = Path(shutil.copytree(trained_ner_checkpoint, tmp_path / "no_tokenizer"))
    (resolve_checkpoint(no_tokenizer) / TOKENIZER_FILE).unlink()
    bad_config = Path(shutil.copytree(trained_ner_checkpoint, tmp_path / "bad_config"))
    (resolve_checkpoint(bad_config) / "config.json").write_text('{"task": "pos"}')
    return {"empty": empty, "no_tokenizer": no_tokenizer, "bad_config": bad_config}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "is not a directory"),
        ("empty", "is not an IMM checkpoint: missing model.safetensors"),
        ("no_tokenizer", "is not an IMM checkpoint: missing tokenizer.json"),
        ("bad_config", "config.json"),
        ("opset 9", "opset 9 is not supported"),
        ("opset 21", "opset 21 is not supported"),
        ("out is a file", "exists and is not a directory"),
        ("out holds other files", "is not a bundle; refusing"),
    ],
)
def test_cli_bad_input(capsys, tmp_path, trained_ner_checkpoint, broken_checkpoints, case, message):
    checkpoint, out, extra = trained_ner_checkpoint, tmp_path / "out", []
    if case in broken_checkpoints:
        checkpoint = broken_checkpoints[case]
    elif case == "missing":
        checkpoint = tmp_path / "nowhere"
    elif case.startswith("opset"):
        extra = ["--opset", case.split()[1]]
    elif case == "out is a file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, "--checkpoint", str(checkpoint), "--out", str(out), *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no staging left
    if case == "out holds other files":
        assert (out / "notes.txt").read_text() == "mine"


def test_cli_subprocess_error_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: checkpoint {tmp_path / 'none'} is not a directory"]
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing(capsys, monkeypatch, tmp_path, trained_ner_checkpoint):
    """A graph that misses parity is refused after the expensive steps: still nothing at --out."""
    import export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", -1.0)
    out = tmp_path / "deep" / "out"
    code, err = run_cli(
        capsys,
        "--checkpoint",
        str(trained_ner_checkpoint),
        "--out",
        str(out),
        "--triton",
        str(tmp_path / "triton"),
    )
    assert code == 2 and err.count("\n") == 1 and "does not match PyTorch" in err
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not (tmp_path / "triton").exists()


def test_a_bundle_reexported_from_its_own_weights_answers_as_it_did(
    capsys, tmp_path, bundles, ner_model, ner_fixture_set
):
    """``--from-bundle``: the weights table, the CRF scores, the tokenizer and the record of how the
    model was trained make the checkpoint again; its fp32 export computes what the bundle did."""
    _, preprocessor = ner_model
    first = load_bundle(bundles["ner-fp32"])
    code, err = run_cli(capsys, "--from-bundle", str(first.directory), "--out", str(tmp_path / "again"))
    assert code == 0, err
    again = load_bundle(tmp_path / "again")
    for key in ("crf", "labels", "scores", "visual_training", "model_name", "preprocessing"):
        assert again.manifest[key] == first.manifest[key], key
    assert str(first.directory) in again.manifest["source"]["checkpoint"]
    feed = batches(preprocessor, ner_fixture_set, 8)[0]
    first_out, again_out = (
        session(bundle).run(["emissions"], {name: feed[name] for name in bundle.input_names})[0]
        for bundle in (first, again)
    )
    np.testing.assert_allclose(first_out, again_out, rtol=0, atol=1e-5)
    code, err = run_cli(capsys, "--from-bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert code == 2 and err.count("\n") == 1 and "not a directory" in err


def test_reexport_replaces_a_bundle(capsys, tmp_path, bundles, trained_re_checkpoint):
    out = Path(shutil.copytree(bundles["re-fp32"], tmp_path / "re"))
    args = (
        "--checkpoint",
        str(trained_re_checkpoint),
        "--out",
        str(out),
        "--precision",
        "int8",
    )
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    bundle = load_bundle(out)
    assert bundle.precision == "int8" and bundle.manifest["quantization"]["batch_independent"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["re"]  # no staging or retired copy left


# --- scoring a bundle ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["ner", "re"])
def test_evaluate_scores_a_bundle_like_its_checkpoint(
    task, bundles, trained_ner_checkpoint, trained_re_checkpoint, tmp_path, capsys
):
    """``imm evaluate --bundle`` (ONNX Runtime + the served decoding) predicts what ``--checkpoint`` does."""
    if task == "ner":
        data, bundle = (
            write_conll(tmp_path / "dev.txt", synthetic_ner_examples(40, seed=11)),
            bundles["ner-fp32"],
        )
        checkpoint = trained_ner_checkpoint
    else:
        data, bundle = (
            write_mnre(tmp_path / "dev.txt", synthetic_re_examples(40, seed=11)),
            bundles["re-fp32"],
        )
        checkpoint = trained_re_checkpoint
    results = {}
    for source, directory in (("--checkpoint", checkpoint), ("--bundle", bundle)):
        predictions = tmp_path / f"{source.strip('-')}.jsonl"
        argv = [
            source,
            str(directory),
            "--data",
            str(data),
            "--batch-size",
            "16",
            "--predictions",
            str(predictions),
        ]
        assert imm_main(["evaluate", *argv]) == 0
        results[source] = json.loads(capsys.readouterr().out)
        results[source]["pred"] = [json.loads(line)["pred"] for line in predictions.read_text().splitlines()]
    assert results["--bundle"]["examples"] == 40
    assert results["--bundle"]["f1"] > 0.5  # the tiny model learned the synthetic data
    assert results["--bundle"] == results["--checkpoint"]


def test_evaluate_refuses_a_tampered_bundle(bundles, tmp_path, capsys):
    tampered = Path(shutil.copytree(bundles["re-fp32"], tmp_path / "tampered"))
    (tampered / TOKENIZER_FILE).write_text("{}")
    data = write_mnre(tmp_path / "dev.txt", synthetic_re_examples(4, seed=11))
    assert imm_main(["evaluate", "--bundle", str(tampered), "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("error: bundle")
        and "does not match its manifest" in error
        and "Traceback" not in error
    )


def test_embedding_rows_are_int8_with_a_scale_each():
    """A Gather of a large table becomes int8 rows times per-row scales: a quarter of the size, error <= half a step."""
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import quantize_embedding_rows

    rng = np.random.default_rng(0)
    table = (rng.normal(size=(2048, 16)) * rng.uniform(0.01, 3.0, size=(2048, 1))).astype(np.float32)
    table[5] = 0.0  # an all-zero row must not divide by zero
    small = rng.normal(size=(64, 16)).astype(np.float32)  # below the size threshold: left alone
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["words"], name="word_embeddings"),
            helper.make_node("Gather", ["small", "positions"], ["position_vectors"], name="positions"),
            helper.make_node("Add", ["words", "position_vectors"], ["out"], name="add"),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None]),
            helper.make_tensor_value_info("positions", TensorProto.INT64, [None, None]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, None, 16])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(small, "small")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert quantize_embedding_rows(model) == {
        "table": {"tensor": "table_rows_int8", "scale": "table_row_scales", "axis": 0}
    }
    onnx.checker.check_model(model)
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "table" not in initializers and initializers["table_rows_int8"].dtype == np.int8
    assert np.array_equal(initializers["small"], small)
    ids = rng.integers(0, 2048, size=(3, 7))
    positions = np.tile(np.arange(7), (3, 1))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"ids": ids, "positions": positions})
    expected = table[ids] + small[positions]
    step = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(out - expected) <= step[ids][..., None] / 2 + 1e-6)
    ids[0, 0] = 5
    (out,) = session.run(None, {"ids": ids, "positions": positions})
    assert np.array_equal(out[0, 0], small[0])


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_answers_do_not_depend_on_the_batch(bundles, ner_model, ner_fixture_set, precision):
    """An example's emissions are the same alone and in batches of 16 and 64, and padded to the
    length of a much longer batch-mate, bit for bit: per-row int8 gives each row its own activation
    scale, and the fused attention computes each example from its own rows."""
    _, preprocessor = ner_model
    bundle = load_bundle(bundles[f"ner-{precision}"])
    runner = session(bundle)
    texts, images = ner_fixture_set
    long_text = preprocessor.text.encode([w for e in synthetic_ner_examples(12, seed=11) for w in e.words])

    def emissions(rows: list[int], extra: list = ()) -> np.ndarray:
        batch = preprocessor.collate(
            [texts[r] for r in rows] + list(extra), [images[r] for r in rows] + [None] * len(extra)
        )
        return runner.run(["emissions"], {name: batch[name] for name in bundle.input_names})[0]

    by_16 = [emissions(list(range(start, start + 16))) for start in (0, 16, 32, 48)]
    width = max(part.shape[1] for part in by_16)
    by_16 = np.concatenate([np.pad(part, ((0, 0), (0, width - part.shape[1]), (0, 0))) for part in by_16])
    by_64 = emissions(list(range(64)))
    padded = emissions(list(range(16)), [long_text])
    assert padded.shape[1] > by_16.shape[1]  # the long batch-mate pads the others further
    for row in range(64):
        words = texts[row].num_words
        (single,) = emissions([row])
        np.testing.assert_array_equal(by_16[row, :words], single[:words])
        np.testing.assert_array_equal(by_64[row, :words], single[:words])
        if row < 16:
            np.testing.assert_array_equal(padded[row, :words], single[:words])


def test_attention_is_fused(bundles):
    """Every self-attention of the exported graph runs as one MultiHeadAttention: the only Softmax
    left is IA's selection of visual knowledge (not an attention)."""
    for name in ("ner-fp32", "ner-int8"):
        graph = onnx.load(str(load_bundle(bundles[name]).model_path)).graph
        fused = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
        softmax = [node.name for node in graph.node if node.op_type == "Softmax"]
        assert fused and all("/selector/" in name for name in softmax)
        assert load_bundle(bundles[name]).manifest["optimization"]["fused"]["MultiHeadAttention"] == len(
            fused
        )


def test_fused_int8_answers_as_the_unfused_graph(tmp_path, bundles, ner_model, ner_fixture_set):
    """The stated tolerance of the attention fusion (docs/export.md): the fused int8 graph decodes
    the same labels as the per-row int8 graph without it on at least 99 % of the fixture words (the
    default bundle: 99.93 % and 99.98 % of the valid words)."""
    from export.onnx_export import export_onnx, sample_batches
    from export.quantize import quantize_per_row

    model, preprocessor = ner_model
    raw, unfused = tmp_path / "raw.onnx", tmp_path / "unfused.onnx"
    export_onnx(model, raw, sample_batches(preprocessor, "ner")[2], 17, visual=True)
    quantize_per_row(raw, unfused)
    bundle = load_bundle(bundles["ner-int8"])
    fused_session, unfused_session = (
        session(bundle),
        ort.InferenceSession(str(unfused), providers=["CPUExecutionProvider"]),
    )
    same = total = 0
    for batch in batches(preprocessor, ner_fixture_set, 8):
        feeds = {name: batch[name] for name in bundle.input_names}
        (fused,) = fused_session.run(["emissions"], feeds)
        (plain,) = unfused_session.run(["emissions"], feeds)
        for ours, theirs in zip(
            decode(bundle, fused, batch["word_mask"]), decode(bundle, plain, batch["word_mask"])
        ):
            same += sum(a == b for a, b in zip(ours, theirs))
            total += len(theirs)
    assert total > 300 and same / total >= 0.99


def test_int8_runs_integer_matmuls_and_weight_only_int8_stays_available(
    tmp_path, bundles, trained_ner_checkpoint, ner_model, ner_fixture_set
):
    """``int8``: every MatMul with a weight but the classifier, and the patch projection, is an integer
    product (MatMulIntegerToFloat) of its input quantized row by row; ``int8-weight-only``: fp32
    MatMuls behind DequantizeLinear. Both keep the labels of each other."""
    _, preprocessor = ner_model
    per_row = load_bundle(bundles["ner-int8"])
    weight_only = load_bundle(export_bundle(trained_ner_checkpoint, tmp_path / "wo", "int8-weight-only"))
    assert weight_only.precision == "int8-weight-only"
    assert per_row.manifest["quantization"]["activations"].startswith("uint8")
    graphs = {
        name: onnx.load(str(bundle.model_path)).graph
        for name, bundle in (("per_row", per_row), ("wo", weight_only))
    }
    constants = {name: {t.name for t in graph.initializer} for name, graph in graphs.items()}
    float_matmuls = [
        node.name
        for node in graphs["per_row"].node
        if node.op_type == "MatMul" and node.input[1] in constants["per_row"]
    ]
    assert float_matmuls == ["/classifier/MatMul"]
    assert sum(node.op_type == "MatMulIntegerToFloat" for node in graphs["per_row"].node) >= 6
    assert not [node for node in graphs["per_row"].node if node.op_type == "Conv"]
    assert not [node for node in graphs["wo"].node if node.op_type == "MatMulIntegerToFloat"]
    texts, images = ner_fixture_set
    labels = {}
    for name, bundle in (("per_row", per_row), ("wo", weight_only)):
        runner = session(bundle)
        batch = preprocessor.collate(texts[:16], images[:16])
        (emissions,) = runner.run(["emissions"], {key: batch[key] for key in bundle.input_names})
        labels[name] = emissions.argmax(-1)[batch["word_mask"]]
    assert (labels["per_row"] == labels["wo"]).mean() >= 0.98


def test_weights_table_rebuilds_the_model(bundles, ner_model):
    """The manifest's weights table gives back every parameter the graph uses (int8: within half a step)."""
    from export.weights import read_weights

    model, _ = ner_model
    state = model.state_dict()
    for name in ("ner-fp32", "ner-int8", "ner-fp16"):
        bundle = load_bundle(bundles[name])
        weights = read_weights(bundle.model_path, bundle.manifest["weights"])
        assert "encoder.isa_layers.0.attention.query.weight" in weights
        assert "encoder.patch_embeddings.projection.weight" in weights  # a picture-trained model keeps it
        for key, value in weights.items():
            expected = state[key].numpy()
            entry = bundle.manifest["weights"][key]
            if "row" in entry:  # only the row the graph reads
                expected = np.where(np.arange(len(expected))[:, None] == entry["row"], expected, 0)
            # int8: half a step of 7-bit MatMul weights (Conv weights and embedding rows: 8-bit)
            bound = {"ner-fp32": 0.0, "ner-int8": np.abs(expected).max() / 63 / 2 + 1e-7}.get(
                name, 1e-3 * max(1.0, float(np.abs(expected).max()))
            )
            assert np.abs(value - expected).max() <= bound, (name, key)


def test_find_weights_by_value():
    from onnx import TensorProto, helper, numpy_helper

    from export.weights import find_weights

    rng = np.random.default_rng(0)
    linear = rng.normal(size=(3, 4)).astype(np.float32)  # torch layout (out, in); the graph stores (in, out)
    types = rng.normal(size=(2, 4)).astype(np.float32)  # the graph only reads row 0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["x", "type0"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 3])],
        initializer=[
            numpy_helper.from_array(linear.T.copy(), "w"),
            numpy_helper.from_array(types[0], "type0"),
        ],
    )
    model = helper.make_model(graph)
    table = find_weights(
        model, {"a.weight": linear, "b.weight": linear.copy(), "types": types, "unused": types * 3}
    )
    assert table["a.weight"] == {"tensor": "w", "transpose": True, "shape": [3, 4]}
    assert table["b.weight"]["tensor"] == "w"  # equal tensors share one initializer
    assert table["types"] == {"tensor": "type0", "transpose": False, "row": 0, "shape": [2, 4]}
    assert "unused" not in table


def test_an_untrained_visual_path_is_left_out(tmp_path, tiny_backbone, ner_model, ner_fixture_set):
    """A model trained on text alone: no visual stream in the graph, and a picture changes nothing."""
    from model.checkpoint import save_checkpoint

    model, preprocessor = ner_model
    checkpoint = save_checkpoint(tmp_path / "text-only", model, preprocessor, training_args={"images": None})
    bundle = load_bundle(export_bundle(checkpoint, tmp_path / "bundle", "int8"))
    assert bundle.manifest["visual_stream"] is False
    assert bundle.input_names == list(INPUT_NAMES["ner"])  # the same signature as every NER bundle
    graph = onnx.load(str(bundle.model_path))
    assert not [node for node in graph.graph.node if node.op_type == "Conv"]
    assert not [key for key in bundle.manifest["weights"] if "patch_embeddings" in key or "visual_ffn" in key]
    runner = session(bundle)
    texts, images = ner_fixture_set
    with_pictures = preprocessor.collate(texts[:8], [images[0]] * 8)
    without = preprocessor.collate(texts[:8], [None] * 8)
    (a,) = runner.run(["emissions"], {name: with_pictures[name] for name in bundle.input_names})
    (b,) = runner.run(["emissions"], {name: without[name] for name in bundle.input_names})
    assert np.array_equal(a, b)
