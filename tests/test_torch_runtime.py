"""The PyTorch runtime, on the CPU: the same answers as ONNX Runtime from the same bundle.

What runs here is the GPU runtime's own code (model rebuilt from the bundle's weights table, the
bucket padding of its CUDA graphs, the batched CRF decoder, the tensor image path) in fp32,
without graph capture, which needs a GPU (bench/gpu_serving.py runs that part on one).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine.runtimes import OnnxRuntime, jpeg_header, resolve_runtime
from engine.runtimes.pytorch import TorchRuntime
from engine.settings import Settings
from export import export_bundle, load_bundle
from export.bundle import session_options
from model.config import CLIP_MEAN, CLIP_STD
from model.crf import CRF
from model.decoding import crf_marginals, viterbi_decode
from model.preprocessing import ImageProcessor, Preprocessor, load_tokenizer, split_words
from model.preprocessing.tensor_image import TOLERANCE, from_pil, resize_normalise
from tests.conftest import jpeg_bytes, synthetic_ner_examples, synthetic_re_examples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, trained_ner_checkpoint, trained_re_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch_runtime_bundles")
    quiet = {"log": lambda _: None}
    return {
        "ner-fp32": export_bundle(trained_ner_checkpoint, root / "ner-fp32", "fp32", **quiet),
        "ner-int8": export_bundle(trained_ner_checkpoint, root / "ner-int8", "int8", **quiet),
        "re-int8": export_bundle(trained_re_checkpoint, root / "re-int8", "int8", **quiet),
    }


def runtimes(path: Path, **torch_options):
    bundle = load_bundle(path)
    preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
    onnx = OnnxRuntime(bundle, preprocessor, ["CPUExecutionProvider"], session_options(1))
    return preprocessor, onnx, TorchRuntime(bundle, preprocessor, device="cpu", **torch_options)


def ner_batch(preprocessor, count: int, seed: int):
    examples = synthetic_ner_examples(count, seed=seed)
    texts = [preprocessor.text.encode(e.words) for e in examples]
    pictures = [preprocessor.image(jpeg_bytes(seed=n)) if n % 3 == 0 else None for n in range(count)]
    return texts, pictures


@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_ner_answers_equal_onnx_runtime(bundles, precision, bucketed):
    preprocessor, onnx, runtime = runtimes(bundles[f"ner-{precision}"], bucketed=bucketed, max_batch_size=8)
    assert runtime.provider.startswith("torch fp32 on cpu")
    for size, seed in ((1, 0), (3, 1), (8, 2), (5, 3)):  # 3 and 5 pad to the buckets of 4 and 8
        texts, pictures = ner_batch(preprocessor, size, seed)
        ours, theirs = runtime.infer(texts, pictures), onnx.infer(texts, pictures)
        assert [t.tolist() for t in ours.tags] == [t.tolist() for t in theirs.tags]
        for a, b in zip(ours.confidence, theirs.confidence):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_re_answers_equal_onnx_runtime(bundles):
    preprocessor, onnx, runtime = runtimes(bundles["re-int8"], bucketed=True, max_batch_size=8)
    examples = synthetic_re_examples(7, seed=5)
    texts = [preprocessor.text.encode_relation(e.words, e.head, e.tail) for e in examples]
    pictures = [preprocessor.image(jpeg_bytes(seed=n)) if n % 2 else None for n in range(7)]
    ours, theirs = runtime.infer(texts, pictures), onnx.infer(texts, pictures)
    assert ours.shape == theirs.shape == (7, len(load_bundle(bundles["re-int8"]).labels))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_an_answer_does_not_depend_on_its_bucket(bundles):
    """One tweet alone, and padded into a bucket of 8 beside seven others: the same tags and scores."""
    preprocessor, _, runtime = runtimes(bundles["ner-int8"], bucketed=True, max_batch_size=8)
    texts, pictures = ner_batch(preprocessor, 8, seed=7)
    together = runtime.infer(texts, pictures)
    for row in range(8):
        alone = runtime.infer(texts[row : row + 1], pictures[row : row + 1])
        assert alone.tags[0].tolist() == together.tags[row].tolist()
        np.testing.assert_allclose(alone.confidence[0], together.confidence[row], atol=1e-5)


def test_an_old_bundle_without_a_weights_table_is_refused(bundles, tmp_path):
    from export.bundle import write_manifest

    source = load_bundle(bundles["ner-fp32"])
    copy = tmp_path / "old"
    copy.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (copy / name).write_bytes((source.directory / name).read_bytes())
    manifest = {k: v for k, v in source.manifest.items() if k not in ("weights", "files", "manifest_sha256")}
    fields = (
        "task",
        "model_name",
        "labels",
        "preprocessing",
        "precision",
        "opset",
        "inputs",
        "outputs",
        "scores",
    )
    write_manifest(
        copy,
        crf=source.crf,
        extra={k: v for k, v in manifest.items() if k not in (*fields, "format_version", "crf")},
        **{k: manifest[k] for k in fields},
    )
    bundle = load_bundle(copy)
    preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
    with pytest.raises(ValueError, match="re-export it"):
        TorchRuntime(bundle, preprocessor, device="cpu")


def test_crf_decode_batch_equals_the_numpy_decoding():
    rng = np.random.default_rng(0)
    for _ in range(40):
        batch, words, tags = int(rng.integers(1, 6)), int(rng.integers(1, 9)), int(rng.integers(2, 7))
        emissions = (rng.normal(size=(batch, words, tags)) * 3).astype(np.float32)
        lengths = rng.integers(1, words + 1, size=batch)
        mask = np.arange(words)[None] < lengths[:, None]
        scores = [rng.normal(size=shape).astype(np.float32) for shape in ((tags, tags), (tags,), (tags,))]
        crf = CRF.from_scores(*(torch.from_numpy(s) for s in scores))
        found, confidence = crf.decode_batch(torch.from_numpy(emissions), torch.from_numpy(mask))
        paths = viterbi_decode(emissions, mask, *scores)
        marginals = crf_marginals(emissions, mask, *scores)
        for row in range(batch):
            n = lengths[row]
            assert found[row, :n].tolist() == paths[row] and not found[row, n:].any()
            expected = marginals[row, np.arange(n), paths[row]]
            np.testing.assert_allclose(confidence[row, :n].numpy(), expected, atol=1e-5)
            assert not confidence[row, n:].any()


def drawn_jpeg(width: int, height: int, seed: int) -> bytes:
    """Rectangles and text: sharp edges, the hardest case for two different resampling paths."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (200, 220, 240))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(5, max(6, width // 3))), int(rng.integers(5, max(6, height // 3)))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw.text((int(rng.integers(0, width)), int(rng.integers(0, height))), "IMM tweet", fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "picture",
    [
        jpeg_bytes(1200, 900, seed=1),
        jpeg_bytes(320, 240, seed=2),
        jpeg_bytes(64, 48, seed=3),
        drawn_jpeg(1200, 900, 4),
        drawn_jpeg(640, 480, 5),
        drawn_jpeg(4000, 3000, 6),
        drawn_jpeg(2000, 500, 7),
    ],
    ids=["photo-1200", "photo-320", "photo-64", "drawn-1200", "drawn-640", "drawn-4000", "drawn-2000x500"],
)
def test_gpu_image_steps_stay_within_tolerance_of_the_cpu_path(picture):
    """nvJPEG's full-size decode + the tensor resize, against the draft-mode CPU path the model trained on."""
    processor = ImageProcessor(224, CLIP_MEAN, CLIP_STD)
    expected = processor(picture)
    full = Image.open(io.BytesIO(picture))
    full.load()  # a full decode at the original size: what nvJPEG gives
    ours = resize_normalise([from_pil(full.convert("RGB"))], 224, CLIP_MEAN, CLIP_STD)[0].numpy()
    difference = np.abs(ours - expected)
    assert difference.mean() <= TOLERANCE["mean_abs"]
    assert np.percentile(difference, 99) <= TOLERANCE["p99_abs"]


def test_jpeg_header_leaves_other_pictures_to_the_cpu_path():
    assert jpeg_header(jpeg_bytes(), 10**7).width == 320
    assert jpeg_header(jpeg_bytes(), 1000) is None  # over the pixel limit: the CPU path says 413
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert jpeg_header(png.getvalue(), 10**7) is None
    assert jpeg_header(b"\xff\xd8\xff" + b"garbage", 10**7) is None


def test_auto_picks_torch_only_with_an_nvidia_driver_and_a_cuda_device(monkeypatch):
    """``auto``: torch needs both a driver (checked without importing torch) and a CUDA device;
    each case set up here, so the test decides the same with or without a GPU."""
    import engine.runtimes as runtimes

    assert resolve_runtime("onnx") == "onnx" and resolve_runtime("torch") == "torch"
    for driver, device, expected in ((False, True, "onnx"), (True, False, "onnx"), (True, True, "torch")):
        monkeypatch.setattr(runtimes, "_nvidia_driver_present", lambda driver=driver: driver)
        monkeypatch.setattr(torch.cuda, "is_available", lambda device=device: device)
        assert resolve_runtime("auto") == expected, (driver, device)


def test_the_service_serves_the_same_answers_on_both_runtimes(bundles, trained_re_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from service import create_app

    re_bundle = export_bundle(trained_re_checkpoint, tmp_path / "re", "fp32", log=lambda _: None)
    text = "RT @fan : alice smith in paris with the lakers today #win"
    answers = {}
    for runtime in ("onnx", "torch"):
        settings = Settings(
            ner_bundle=bundles["ner-int8"],
            re_bundle=re_bundle,
            runtime=runtime,
            device="cpu",
            intra_op_threads=1,
        )
        with TestClient(create_app(settings)) as client:
            assert client.app.state.engine.loaded.wait(60)
            ready = client.get("/ready").json()
            assert ready["models"]["ner"]["provider"].startswith("torch" if runtime == "torch" else "CPU")
            ner = client.post(
                "/ner", data={"text": text}, files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}
            )
            head = [w for w in split_words(text) if w[0] == "alice"][0]
            tail = [w for w in split_words(text) if w[0] == "paris"][0]
            rel = client.post(
                "/re",
                data={
                    "text": text,
                    "head_start": head[1],
                    "head_end": head[2],
                    "tail_start": tail[1],
                    "tail_end": tail[2],
                },
            )
            assert ner.status_code == rel.status_code == 200, (ner.text, rel.text)
            answers[runtime] = (ner.json(), rel.json())
    (ner_onnx, re_onnx), (ner_torch, re_torch) = answers["onnx"], answers["torch"]
    assert [(e["type"], e["start"], e["end"]) for e in ner_onnx["entities"]] == [
        (e["type"], e["start"], e["end"]) for e in ner_torch["entities"]
    ]
    assert ner_onnx["entities"] and ner_torch["image_used"] is True
    assert re_onnx["relation"] == re_torch["relation"]
    assert abs(re_onnx["score"] - re_torch["score"]) < 1e-4
    json.dumps(answers)  # plain JSON on both


def test_the_other_reading_of_eq_21_exports_and_serves_alike(trained_ner_checkpoint, tmp_path):
    """``ia_slots`` (issue 16): the reading that is not the default goes through export (the graph
    equals PyTorch on mixed batches) and both runtimes (the PyTorch one rebuilds it from the
    manifest's config) with the same answers; the same weights answer differently under it."""
    import dataclasses

    import onnxruntime as ort

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.modeling import IMMForNER

    default, preprocessor = load_checkpoint(trained_ner_checkpoint)
    other = "all" if default.config.ia_slots == "token" else "token"
    model = IMMForNER(dataclasses.replace(default.config, ia_slots=other)).eval()
    model.load_state_dict(default.state_dict())
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, preprocessor)
    path = export_bundle(checkpoint, tmp_path / "bundle", "fp32", log=lambda _: None)
    bundle = load_bundle(path)
    assert bundle.manifest["source"]["config"]["ia_slots"] == other
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    texts, pictures = ner_batch(preprocessor, 8, seed=11)
    arrays = preprocessor.collate(texts, pictures)
    assert 0 < arrays["has_image"].sum() < 8
    (emissions,) = session.run(["emissions"], {name: arrays[name] for name in bundle.input_names})
    batch = {name: torch.from_numpy(array) for name, array in arrays.items()}
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
        as_default = default.eval()(**batch).logits.numpy()
    np.testing.assert_allclose(emissions, expected, atol=1e-4)
    pictured = arrays["has_image"]
    assert np.abs(expected[pictured] - as_default[pictured]).max() > 1e-3  # the reading matters ...
    np.testing.assert_allclose(expected[~pictured], as_default[~pictured], atol=1e-5)  # ... with a picture
    preprocessor, onnx, runtime = runtimes(path, bucketed=True, max_batch_size=8)
    assert runtime.forward.graph.model.config.ia_slots == other
    ours, theirs = runtime.infer(texts, pictures), onnx.infer(texts, pictures)
    assert [t.tolist() for t in ours.tags] == [t.tolist() for t in theirs.tags]
    for a, b in zip(ours.confidence, theirs.confidence):
        np.testing.assert_allclose(a, b, atol=1e-4)
