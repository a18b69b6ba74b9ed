"""Forward and backward for both tasks with the real MiniLM backbone and a real JPEG."""

import torch

from model.checkpoint import create_model
from tests.conftest import NER_LABELS, jpeg_bytes


def test_minilm_ner_and_re_train_step(minilm_dir):
    torch.manual_seed(0)
    words = "Kevin Durant joins the Golden State Warriors in Oakland".split()
    photo = jpeg_bytes(width=1200, height=900)
    for task, labels in (
        ("ner", NER_LABELS),
        ("re", ["None", "/per/org/member_of", "/per/loc/place_of_residence"]),
    ):
        model, preprocessor = create_model(task, labels, minilm_dir)
        assert (model.config.num_isa_layers, model.config.num_ia_layers) == (4, 2)
        if task == "ner":
            text = preprocessor.text.encode(words)
            target = torch.tensor([[1, 2, 0, 0, 5, 6, 6, 0, 3]])
        else:
            text = preprocessor.text.encode_relation(words, (0, 2), (4, 7))
            target = torch.tensor([1])
        arrays = preprocessor.collate([text], [preprocessor.image(photo)])
        batch = {name: torch.from_numpy(array) for name, array in arrays.items()}
        model.train()
        output = model(**batch, labels=target)
        assert torch.isfinite(output.loss)
        output.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
        # phi_v starts at zero, so the image's first gradient lands on it (then flows to the patches)
        assert model.encoder.ia_layers[0].selector.value_projection.weight.grad.abs().sum() > 0
