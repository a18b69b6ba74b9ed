"""The IMM architecture on a tiny random BERT: shapes, masks, invariances, weight loading."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model.checkpoint import create_model, load_checkpoint, read_json, save_checkpoint
from model.modeling import IMMForNER
from tests.conftest import NER_LABELS, jpeg_bytes

SENTENCES = [
    "RT @someone : Alice Smith visits Paris today".split(),
    "Go Bulls".split(),
    "the New York Knicks beat the Boston Celtics at Madison Square Garden tonight".split(),
]


def batch_for(preprocessor, sentences, images):
    texts = [preprocessor.text.encode(words) for words in sentences]
    arrays = preprocessor.collate(texts, images)
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


@pytest.fixture()
def ner(tiny_backbone):
    torch.manual_seed(0)
    model, preprocessor = create_model("ner", NER_LABELS, tiny_backbone)
    return model.eval(), preprocessor


def image(preprocessor, seed):
    return preprocessor.image(jpeg_bytes(seed=seed))


def test_shapes_and_masks(ner):
    model, preprocessor = ner
    batch = batch_for(preprocessor, SENTENCES, [image(preprocessor, 0), None, image(preprocessor, 1)])
    assert batch["pixel_values"].shape == (2, 3, 224, 224)  # the pictures there are, in batch order
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["word_mask"].sum(1).tolist() == [len(s) for s in SENTENCES]
    encoded = model.encoder(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["has_image"]
    )
    assert encoded.isa_visual.shape == (2, 1 + 49, 32)  # per picture: visual [CLS] + 7x7 patches
    output = model(**batch)
    assert output.logits.shape == (3, len(SENTENCES[2]), len(NER_LABELS))
    tags = model.predict(**batch)
    assert [len(t) for t in tags] == [len(s) for s in SENTENCES]


@pytest.mark.parametrize(
    ("attention_mode", "ia_slots"),
    [("separate", "token"), ("joint", "token"), ("separate", "all"), ("joint", "all")],
)
def test_padding_does_not_change_outputs(tiny_backbone, attention_mode, ia_slots):
    """Also: with ``ia_slots="all"`` the slots of padding tokens are masked out."""
    torch.manual_seed(0)
    model, preprocessor = create_model(
        "ner", NER_LABELS, tiny_backbone, attention_mode=attention_mode, ia_slots=ia_slots
    )
    _activate_ia(model)
    model.eval()
    images = [image(preprocessor, 0), None, image(preprocessor, 1)]
    together = model(**batch_for(preprocessor, SENTENCES, images)).logits
    for row, (words, picture) in enumerate(zip(SENTENCES, images)):
        alone = model(**batch_for(preprocessor, [words], [picture])).logits[0]
        assert torch.allclose(together[row, : len(words)], alone, atol=1e-5)


def _activate_ia(model):
    """phi_v starts at zero (IA off at init); give it weights so the tests see the visual path."""
    with torch.no_grad():
        for layer in model.encoder.ia_layers:
            layer.selector.value_projection.weight.normal_(0, 0.5)
            # a bias too: a zero picture then selects a nonzero value, which only the mask can remove
            layer.selector.value_projection.bias.normal_(0, 0.5)


@pytest.mark.parametrize("ia_slots", ["token", "all"])
def test_ia_without_image_is_exactly_the_plain_ffn(tiny_backbone, ia_slots):
    torch.manual_seed(0)
    with_ia, preprocessor = create_model("ner", NER_LABELS, tiny_backbone, ia_slots=ia_slots)
    _activate_ia(with_ia)
    without_ia, _ = create_model("ner", NER_LABELS, tiny_backbone, use_ia=False)
    without_ia.load_state_dict(with_ia.state_dict(), strict=False)
    with_ia.eval(), without_ia.eval()
    no_image = batch_for(preprocessor, SENTENCES, [None] * 3)
    assert torch.equal(with_ia(**no_image).logits, without_ia(**no_image).logits)
    # ... also for the text-only row of a batch that has pictures (the full graph, as exported) ...
    mixed = batch_for(preprocessor, SENTENCES, [image(preprocessor, 0), None, image(preprocessor, 1)])
    assert torch.equal(with_ia(**mixed).logits[1], without_ia(**mixed).logits[1])
    # ... and the image does reach the text once IA is active
    pictures = batch_for(preprocessor, SENTENCES, [image(preprocessor, s) for s in range(3)])
    assert not torch.allclose(with_ia(**pictures).logits, without_ia(**pictures).logits, atol=1e-4)


def test_the_two_readings_of_eq_21_differ_with_the_same_weights(tiny_backbone):
    """``ia_slots`` adds no parameter; "all" lets a token activate the other tokens' slots too."""
    torch.manual_seed(0)
    token, preprocessor = create_model("ner", NER_LABELS, tiny_backbone, ia_slots="token")
    _activate_ia(token)
    every, _ = create_model("ner", NER_LABELS, tiny_backbone, ia_slots="all")
    every.load_state_dict(token.state_dict())  # strict: the same parameters
    token.eval(), every.eval()
    pictures = batch_for(preprocessor, SENTENCES, [image(preprocessor, s) for s in range(3)])
    assert not torch.allclose(token(**pictures).logits, every(**pictures).logits, atol=1e-4)


@pytest.mark.parametrize("ia_slots", ["token", "all"])
@pytest.mark.parametrize("attention_mode", ["separate", "joint"])
def test_text_only_shortcut_equals_the_full_computation(tiny_backbone, attention_mode, ia_slots):
    torch.manual_seed(0)
    model, preprocessor = create_model(
        "ner", NER_LABELS, tiny_backbone, attention_mode=attention_mode, ia_slots=ia_slots
    )
    _activate_ia(model)
    model.eval()
    batch = batch_for(preprocessor, SENTENCES, [None] * 3)
    assert batch["pixel_values"].shape[0] == 0
    skipped = model(**batch).logits
    # the full computation on zero pictures (as exported), which the shortcut must reproduce exactly
    model.encoder._text_only = lambda pixel_values: False
    assert torch.equal(model(**batch).logits, skipped)


def test_fresh_model_reproduces_the_backbone(tiny_backbone):
    """With phi_v at zero, the text path is the pretrained BERT itself: the weight mapping and post-LN are right."""
    from transformers import BertModel

    model, preprocessor = create_model("ner", NER_LABELS, tiny_backbone)
    bert = BertModel.from_pretrained(tiny_backbone).eval()
    model.eval()
    batch = batch_for(preprocessor, SENTENCES, [image(preprocessor, 0), None, None])
    ours = model.encoder(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["has_image"]
    )
    theirs = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.allclose(ours.text[mask], theirs[mask], atol=1e-5)


def test_visual_ffn_starts_as_a_copy_of_the_text_ffn(ner):
    model, _ = ner
    for layer in [*model.encoder.isa_layers, *model.encoder.ia_layers]:
        assert torch.equal(layer.text_ffn.up.weight, layer.visual_ffn.up.weight)
        assert layer.text_ffn.up.weight.data_ptr() != layer.visual_ffn.up.weight.data_ptr()


def test_crf_decode_equals_brute_force(ner):
    model, _ = ner
    crf = model.head.crf
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in (crf.transitions, crf.start_transitions, crf.end_transitions):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    num_tags = len(NER_LABELS)
    emissions = torch.randn(1, 3, num_tags, generator=generator)
    best = max(
        itertools.product(range(num_tags), repeat=3),
        key=lambda tags: crf._compute_score(
            emissions.transpose(0, 1), torch.tensor(tags)[:, None], torch.ones(3, 1, dtype=torch.bool)
        ).item(),
    )
    assert model.head.decode(emissions, torch.ones(1, 3, dtype=torch.bool)) == [list(best)]


def test_loss_and_backward_reach_every_new_module(tiny_backbone, tiny_clip):
    from model.teacher import CLIPTeacher

    torch.manual_seed(0)
    model, preprocessor = create_model("ner", NER_LABELS, tiny_backbone)
    _activate_ia(model)
    teacher = CLIPTeacher.from_pretrained(tiny_clip)
    pictures = [preprocessor.image.load(jpeg_bytes(seed=s)) for s in range(3)]
    batch = batch_for(preprocessor, SENTENCES, [preprocessor.image.to_array(p) for p in pictures])
    batch["augmented_pixel_values"] = batch["pixel_values"].flip(-1)
    batch["teacher_text"] = teacher.embed_texts([" ".join(s) for s in SENTENCES])
    batch["teacher_image"] = teacher.embed_images(pictures)
    labels = torch.zeros(batch["word_index"].shape, dtype=torch.long)
    labels[0, 3:5] = torch.tensor([1, 2])
    model.train()
    output = model(**batch, labels=labels)
    assert output.sw is not None and output.sw.total.item() > 0
    expected = model.config.delta * output.task_loss + model.config.gamma * output.sw.total
    assert torch.allclose(output.loss, expected)
    output.loss.backward()
    for name in (
        "patch_embeddings.projection.weight",
        "isa_layers.0.visual_ffn.up.weight",
        "ia_layers.0.selector.key_projection.weight",
        "ia_layers.0.selector.value_projection.weight",
    ):
        grad = model.encoder.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_sw_needs_two_images_in_the_batch(ner):
    model, preprocessor = ner
    batch = batch_for(preprocessor, SENTENCES, [image(preprocessor, 0), None, None])
    batch["augmented_pixel_values"] = batch["pixel_values"]
    batch["teacher_text"] = batch["teacher_image"] = torch.ones(3, 4)
    assert model(**batch).sw is None


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path, ner):
    model, preprocessor = ner
    batch = batch_for(preprocessor, SENTENCES, [image(preprocessor, 0), None, None])
    target = tmp_path / "checkpoint"
    save_checkpoint(target, model, preprocessor, training_args={"lr": 1e-4}, scores={"f1": 0.5})
    save_checkpoint(target, model, preprocessor, scores={"f1": 0.6})  # replaces it: the next generation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no staging left beside it
    assert sorted(p.name for p in (target / "generations").iterdir()) == ["000002"]  # nor old generations
    loaded, loaded_preprocessor = load_checkpoint(target)
    assert isinstance(loaded, IMMForNER)
    loaded.eval()
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    words = SENTENCES[2]
    assert np.array_equal(
        preprocessor.text.encode(words).input_ids, loaded_preprocessor.text.encode(words).input_ids
    )
    assert read_json(target, "scores.json") == {"f1": 0.6}


def test_relation_model_uses_markers(tiny_backbone):
    torch.manual_seed(0)
    labels = ["None", "/per/loc/place_of_residence", "/per/per/peer"]
    for pooling in ("cls", "entity_start"):
        model, preprocessor = create_model("re", labels, tiny_backbone, re_pooling=pooling)
        words = SENTENCES[0]
        encoded = preprocessor.text.encode_relation(words, (3, 5), (6, 7))
        ids = encoded.input_ids.tolist()
        tokenizer = preprocessor.text.tokenizer
        assert ids[encoded.marker_index[0]] == tokenizer.token_to_id("<s>")
        assert ids[encoded.marker_index[1]] == tokenizer.token_to_id("<o>")
        arrays = preprocessor.collate([encoded], [None])
        batch = {name: torch.from_numpy(array) for name, array in arrays.items()}
        output = model(**batch, labels=torch.tensor([1]))
        assert output.logits.shape == (1, 3)
        output.loss.backward()
        assert model.predict(**batch)[0] in labels


@pytest.mark.parametrize("attention_mode, picture_matters", [("separate", False), ("joint", True)])
def test_without_ia_only_joint_attention_carries_the_picture_to_the_text(
    tiny_backbone, attention_mode, picture_matters
):
    """Why ``--no-ia`` alone is a text-only model and the ablation comparable to the paper's "w/o IA"
    (Figure 4) adds ``--attention-mode joint`` (docs/architecture.md)."""
    torch.manual_seed(0)
    model, preprocessor = create_model(
        "ner", NER_LABELS, tiny_backbone, use_ia=False, attention_mode=attention_mode
    )
    model.eval()
    with_picture = model(**batch_for(preprocessor, SENTENCES[:1], [image(preprocessor, 0)])).logits
    without = model(**batch_for(preprocessor, SENTENCES[:1], [None])).logits
    assert torch.equal(with_picture, without) != picture_matters
