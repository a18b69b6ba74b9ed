"""Pictures are read only by models that learned from them (issue 14, part 3).

A model trained on text alone is exported without its visual stream: the server does not decode
a picture sent to it and answers exactly as without one, with ``image_used: false`` and a note.
A picture-trained model (the conftest fixtures train with pictures) still reads it. Both runtimes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from export import export_bundle, load_bundle
from model.checkpoint import load_checkpoint, save_checkpoint, visual_training
from service import Settings, create_app
from tests.conftest import jpeg_bytes

TEXT = "RT @fan : alice smith and bob jones in paris with the lakers today #win"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, trained_ner_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("visual_stream")
    model, preprocessor = load_checkpoint(trained_ner_checkpoint)
    # The same weights, recorded as trained on text alone (what model.train writes without --images).
    text_only = save_checkpoint(root / "text-only", model, preprocessor, training_args={"images": None})
    assert visual_training(text_only)["trained"] is False
    return {
        "pictures": export_bundle(trained_ner_checkpoint, root / "pictures", "int8", log=lambda _: None),
        "text-only": export_bundle(text_only, root / "text-only-bundle", "int8", log=lambda _: None),
    }


def answers(bundle: Path, runtime: str) -> tuple[dict, dict, str]:
    settings = Settings(ner_bundle=bundle, re_bundle="", runtime=runtime, device="cpu", intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.engine.loaded.wait(60)
        photo = {"image": ("photo.jpg", jpeg_bytes(640, 480, seed=3), "image/jpeg")}
        with_picture = client.post("/ner", data={"text": TEXT}, files=photo)
        without = client.post("/ner", data={"text": TEXT})
    assert with_picture.status_code == without.status_code == 200
    return with_picture.json(), without.json(), with_picture.headers["server-timing"]


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_a_text_only_model_ignores_the_picture_without_decoding_it(bundles, runtime):
    assert load_bundle(bundles["text-only"]).manifest["visual_stream"] is False
    with_picture, without, timing = answers(bundles["text-only"], runtime)
    assert with_picture["entities"] == without["entities"] and with_picture["entities"]
    assert with_picture["image_used"] is False
    assert with_picture["notes"] == ["the picture was not used: this NER model was trained without pictures"]
    assert without["notes"] == []
    assert "decode" not in timing  # the picture was never decoded


def test_a_text_only_model_still_refuses_what_is_no_picture(bundles):
    """The picture is not decoded, but its header is read: a non-image is a 415, a pixel bomb a 413
    and a JPEG cut inside its header a 422, as with a model that reads pictures; one cut inside its
    pixel data passes (nothing reads them)."""
    import io

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpixels (limit 64) in a few KB
    settings = Settings(ner_bundle=bundles["text-only"], re_bundle="", runtime="onnx", intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.engine.loaded.wait(60)
        post = lambda name, data, kind: client.post(  # noqa: E731
            "/ner", data={"text": TEXT}, files={"image": (name, data, kind)}
        )
        not_a_picture = post("a.jpg", b"hello", "image/jpeg")
        assert not_a_picture.status_code == 415, not_a_picture.text
        assert not_a_picture.json()["detail"][0]["loc"] == ["body", "image"]
        huge = post("huge.png", bomb.getvalue(), "image/png")
        assert huge.status_code == 413, huge.text
        photo = jpeg_bytes()
        cut_in_header = post("b.jpg", photo[:600], "image/jpeg")
        assert cut_in_header.status_code == 422, cut_in_header.text
        cut_in_pixels = post("c.jpg", photo[: len(photo) // 2], "image/jpeg")
        assert cut_in_pixels.status_code == 200 and cut_in_pixels.json()["image_used"] is False


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_a_picture_trained_model_still_reads_the_picture(bundles, runtime):
    assert load_bundle(bundles["pictures"]).manifest["visual_stream"] is True
    with_picture, without, timing = answers(bundles["pictures"], runtime)
    assert with_picture["image_used"] is True and with_picture["notes"] == []
    assert "decode" in timing
    scores = lambda answer: [(e["start"], e["end"], e["type"], e["score"]) for e in answer["entities"]]  # noqa: E731
    assert scores(with_picture) != scores(without)  # the picture changes the CRF's confidences
