import pytest

from model.config import IMMConfig, default_layer_split
from tests.conftest import NER_LABELS


def test_json_round_trip(tmp_path, minilm_dir):
    config = IMMConfig.from_backbone(minilm_dir, "ner", NER_LABELS, attention_mode="joint", ia_top_k=5)
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert IMMConfig.from_json_file(path) == config


def test_default_layer_split_is_two_thirds_isa(minilm_dir):
    assert default_layer_split(12) == (8, 4)
    assert default_layer_split(6) == (4, 2)
    config = IMMConfig.from_backbone(minilm_dir, "re", ["None", "x"])
    assert (config.num_isa_layers, config.num_ia_layers) == (4, 2)
    assert config.hidden_size == 384


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_isa_layers": 5, "num_ia_layers": 2}, "does not fit"),
        ({"patch_size": 30}, "not a multiple"),
        ({"attention_mode": "cross"}, "attention_mode"),
        ({"re_pooling": "mean"}, "re_pooling"),
    ],
)
def test_invalid_settings_are_refused(minilm_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        IMMConfig.from_backbone(minilm_dir, "ner", NER_LABELS, **overrides)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown IMMConfig fields"):
        IMMConfig.from_dict({"task": "ner", "labels": ["O"], "num_isa_layer": 3})
