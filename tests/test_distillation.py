"""Distillation from an ensemble: the loss, the soft-targets file, ``model.distill`` and ``model.train --soft-targets``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import create_model, load_checkpoint, read_json, save_checkpoint
from model.crf import CRF
from model.data import NERExample, read_twitter_conll
from model.distill import main as distill_main
from model.distillation import DistillationError, SoftTargets, example_hashes, mnre_sentences
from model.distillation_loss import kl_divergence, ner_distillation_loss, re_distillation_loss
from model.evaluate import main as evaluate_main
from model.train import main as train_main
from tests.conftest import NER_LABELS, RE_LABELS, synthetic_ner_examples, synthetic_re_examples
from tests.test_train import FAST, assert_resume_matches_straight, write_conll, write_mnre

# --- the loss --------------------------------------------------------------------------------


def _crf(num_tags: int = 5, seed: int = 0) -> CRF:
    generator = torch.Generator().manual_seed(seed)
    crf = CRF(num_tags, batch_first=True)
    with torch.no_grad():
        for parameter in (crf.transitions, crf.start_transitions, crf.end_transitions):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return crf


def _emissions(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    emissions = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(seed)) * 2
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 1])[:, None]
    return emissions, mask


def test_log_marginals_are_the_log_of_the_marginals():
    crf = _crf()
    emissions, mask = _emissions()
    marginals = crf.marginals(emissions, mask)
    log_marginals = crf.log_marginals(emissions, mask)
    torch.testing.assert_close(log_marginals.exp()[mask], marginals[mask])
    assert torch.all(log_marginals[~mask] == 0)


def test_ner_loss_is_zero_at_the_students_own_marginals_and_positive_elsewhere():
    crf = _crf()
    emissions, mask = _emissions()
    own = crf.marginals(emissions, mask).detach()
    assert abs(ner_distillation_loss(emissions, crf, mask, own).item()) < 1e-5
    other = _crf(seed=7).marginals(emissions, mask).detach()
    assert ner_distillation_loss(emissions, crf, mask, other).item() > 0.01
    one_hot = torch.nn.functional.one_hot(own.argmax(-1), 5).float() * mask.unsqueeze(-1)
    # KL to a one-hot = its NLL, summed over a sentence's words, averaged over the sentences
    expected = -(crf.log_marginals(emissions, mask) * one_hot).sum() / mask.any(dim=1).sum()
    torch.testing.assert_close(ner_distillation_loss(emissions, crf, mask, one_hot), expected)


def test_ner_loss_gradient_reaches_the_emissions_and_the_crf():
    crf = _crf()
    emissions, mask = _emissions()
    emissions.requires_grad_(True)
    targets = _crf(seed=7).marginals(emissions.detach(), mask)
    ner_distillation_loss(emissions, crf, mask, targets).backward()
    assert emissions.grad[mask].abs().sum() > 0 and torch.all(emissions.grad[~mask] == 0)
    assert crf.transitions.grad.abs().sum() > 0 and torch.isfinite(crf.transitions.grad).all()


def test_ner_loss_weights_and_target_mask():
    crf = _crf()
    emissions, mask = _emissions()
    targets = _crf(seed=7).marginals(emissions, mask)
    full = ner_distillation_loss(emissions, crf, mask, targets)
    assert ner_distillation_loss(emissions, crf, mask, targets, weights=torch.zeros(3)).item() == 0.0
    half = ner_distillation_loss(emissions, crf, mask, targets, weights=torch.full((3,), 0.5))
    torch.testing.assert_close(half, full * 0.5)
    first_row = torch.zeros_like(mask)
    first_row[0] = True
    only_first = ner_distillation_loss(emissions, crf, mask, targets, target_mask=first_row)
    expected = ner_distillation_loss(emissions[:1], crf, mask[:1], targets[:1])
    torch.testing.assert_close(only_first, expected)
    with pytest.raises(ValueError, match="one value per example"):
        ner_distillation_loss(emissions, crf, mask, targets, weights=torch.ones(2))


def test_re_loss_is_zero_at_the_students_softmax_and_has_a_gradient():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert abs(re_distillation_loss(logits, logits.softmax(-1).detach()).item()) < 1e-6
    targets = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), -1)
    loss = re_distillation_loss(logits, targets)
    expected = (targets * (targets.log() - logits.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_kl_of_a_zero_probability_is_finite():
    teacher = torch.tensor([[1.0, 0.0]])
    assert math.isclose(kl_divergence(teacher, torch.tensor([[0.0, -math.inf]])).item(), 0.0, abs_tol=1e-9)
    assert torch.isfinite(kl_divergence(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -math.inf]])))


# --- the file --------------------------------------------------------------------------------


def _targets(examples, labels=NER_LABELS) -> SoftTargets:
    counts = torch.tensor([len(e.words) for e in examples])
    probabilities = torch.softmax(torch.randn(int(counts.sum()), len(labels)), -1)
    return SoftTargets(
        task="ner",
        labels=list(labels),
        teachers=[{"checkpoint": "a", "seed": 1, "dev_f1": 0.5}],
        data_files=["train.txt"],
        hashes=example_hashes(examples),
        probabilities=probabilities,
        confidence=torch.rand(len(examples)),
        word_counts=counts,
        dev={"mean_f1": {"ensemble": {"marginal_argmax": 0.5}}},
    )


def test_targets_file_round_trip_and_refusals(tmp_path):
    examples = synthetic_ner_examples(10, seed=2)
    targets = _targets(examples)
    targets.save(tmp_path / "t.safetensors")
    loaded = SoftTargets.load(tmp_path / "t.safetensors")
    assert (loaded.task, loaded.labels, loaded.teachers, loaded.data_files, loaded.dev, loaded.labelled) == (
        "ner", NER_LABELS, targets.teachers, ["train.txt"], targets.dev, True
    )  # fmt: skip
    for number, example in enumerate(examples):
        assert loaded.example(number).shape == (len(example.words), len(NER_LABELS))
        torch.testing.assert_close(loaded.example(number), targets.example(number))
    torch.testing.assert_close(loaded.confidence, targets.confidence)
    loaded.check_examples(examples, ["train.txt"], task="ner", labels=NER_LABELS)
    loaded.check_examples(examples[:4], ["train.txt"], task="ner", labels=NER_LABELS, prefix=True)
    changed = [*examples[:3], NERExample(("other", "words"), ("O", "O"), None), *examples[4:]]
    with pytest.raises(DistillationError, match=r"example 3 \('other words'\) differs"):
        loaded.check_examples(changed, ["x.txt"], task="ner", labels=NER_LABELS)
    with pytest.raises(DistillationError, match="10 examples.*not for x.txt \\(4 examples\\)"):
        loaded.check_examples(examples[:4], ["x.txt"], task="ner", labels=NER_LABELS)
    with pytest.raises(DistillationError, match="task ner, not re"):
        loaded.check_examples(examples, ["x.txt"], task="re", labels=NER_LABELS)
    with pytest.raises(DistillationError, match="labels"):
        loaded.check_examples(examples, ["x.txt"], task="ner", labels=NER_LABELS[::-1])
    (tmp_path / "bad.safetensors").write_text("not safetensors")
    with pytest.raises(DistillationError, match="not a safetensors file"):
        SoftTargets.load(tmp_path / "bad.safetensors")


def test_mnre_sentences_are_each_distinct_sentence_once(tmp_path):
    examples = synthetic_re_examples(12, seed=5)
    path = write_mnre(tmp_path / "mnre.txt", [*examples, *examples[:5]])
    sentences = mnre_sentences(path)
    assert [s.words for s in sentences] == list(dict.fromkeys(e.words for e in examples))
    assert all(s.tags == () for s in sentences)


# --- the commands on tiny teachers ------------------------------------------------------------


@pytest.fixture(scope="module")
def ner_teachers(tmp_path_factory, trained_ner_checkpoint, tiny_backbone) -> list[Path]:
    """Two teachers: the trained tiny NER model, and an untrained one (a different "seed")."""
    torch.manual_seed(5)
    untrained, preprocessor = create_model("ner", NER_LABELS, tiny_backbone)
    other = save_checkpoint(tmp_path_factory.mktemp("teacher") / "ner_b", untrained, preprocessor)
    return [trained_ner_checkpoint, other]


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("distill_data")
    examples = synthetic_ner_examples(40, seed=11)
    return write_conll(directory / "train.txt", examples), write_conll(directory / "dev.txt", examples[:16])


def test_distill_writes_targets_and_prints_the_ensembles_and_teachers_f1(
    tmp_path, ner_teachers, ner_data, capsys
):
    train_file, dev_file = ner_data
    out = tmp_path / "targets.safetensors"
    argv = ["--task", "ner", "--teacher", *map(str, ner_teachers), "--data", str(train_file),
            "--dev", str(dev_file), "--out", str(out), "--batch-size", "7"]  # fmt: skip
    assert distill_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    dev = summary["dev"]["files"][str(dev_file)]
    assert set(dev["ensemble"]) == {"marginal_argmax", "mean_emissions_viterbi"}
    assert set(dev["teachers"]) == {str(t) for t in ner_teachers}
    for number, teacher in enumerate(ner_teachers):  # each teacher's F1 is model.evaluate's
        assert evaluate_main(["--checkpoint", str(teacher), "--data", str(dev_file)]) == 0
        expected = json.loads(capsys.readouterr().out)["f1"]
        assert dev["teachers"][str(teacher)]["f1"] == pytest.approx(expected)
        assert summary["teachers"][number]["checkpoint"] == str(teacher)
    assert dev["teachers"][str(ner_teachers[0])]["f1"] > 0.9  # the trained one
    for scores in dev["ensemble"].values():
        assert 0.0 <= scores["f1"] <= 1.0
    assert (
        summary["dev"]["mean_f1"]["ensemble"]["marginal_argmax"] == dev["ensemble"]["marginal_argmax"]["f1"]
    )

    targets = SoftTargets.load(out)
    examples = read_twitter_conll(train_file)
    targets.check_examples(examples, [str(train_file)], task="ner", labels=NER_LABELS)
    assert targets.dev == summary["dev"] and len(targets.teachers) == 2
    teachers = [load_checkpoint(t) for t in ner_teachers]
    first = examples[0]
    marginals = []
    for model, preprocessor in teachers:  # the mean of the teachers' CRF marginals, by hand
        batch = {
            k: torch.from_numpy(v)
            for k, v in preprocessor.collate([preprocessor.text.encode(first.words)], [None]).items()
        }
        with torch.no_grad():
            emissions = model.eval()(**batch).logits
            marginals.append(model.head.crf.marginals(emissions, batch["word_mask"])[0])
    torch.testing.assert_close(targets.example(0), torch.stack(marginals).mean(0), atol=1e-5, rtol=1e-5)
    for number, example in enumerate(examples):
        rows = targets.example(number)
        assert rows.shape == (len(example.words), len(NER_LABELS))
        torch.testing.assert_close(rows.sum(-1), torch.ones(len(example.words)))
        assert targets.confidence[number] == pytest.approx(float(rows.max(-1).values.mean()))


def test_distill_refuses_teachers_of_another_task_or_twice(
    tmp_path, ner_teachers, trained_re_checkpoint, ner_data, capsys
):
    train_file, _ = ner_data
    for teachers, message in (
        ([ner_teachers[0], trained_re_checkpoint], "is a re model, not ner"),
        ([ner_teachers[0], ner_teachers[0]], "is given twice"),
    ):
        argv = ["--task", "ner", "--teacher", *map(str, teachers), "--data", str(train_file),
                "--out", str(tmp_path / "t.safetensors")]  # fmt: skip
        assert distill_main(argv) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error
    assert not (tmp_path / "t.safetensors").exists()


def test_distill_refuses_teachers_with_different_labels(
    tmp_path, ner_teachers, tiny_backbone, ner_data, capsys
):
    model, preprocessor = create_model("ner", NER_LABELS[::-1], tiny_backbone)
    odd = save_checkpoint(tmp_path / "odd", model, preprocessor)
    argv = ["--task", "ner", "--teacher", str(ner_teachers[0]), str(odd), "--data", str(ner_data[0]),
            "--out", str(tmp_path / "t.safetensors")]  # fmt: skip
    assert distill_main(argv) == 2
    assert "different label lists" in capsys.readouterr().err


def test_re_distill_averages_probabilities(tmp_path, trained_re_checkpoint, tiny_backbone, capsys):
    model, preprocessor = create_model("re", RE_LABELS, tiny_backbone)
    other = save_checkpoint(tmp_path / "re_b", model, preprocessor)
    data = write_mnre(tmp_path / "re.txt", synthetic_re_examples(20, seed=6))
    out = tmp_path / "re.safetensors"
    argv = ["--task", "re", "--teacher", str(trained_re_checkpoint), str(other), "--data", str(data),
            "--dev", str(data), "--out", str(out)]  # fmt: skip
    assert distill_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["dev"]["files"][str(data)]["ensemble"]) == {"mean_probabilities"}
    targets = SoftTargets.load(out)
    assert targets.probabilities.shape == (20, len(RE_LABELS)) and targets.word_counts is None
    torch.testing.assert_close(targets.probabilities.sum(-1), torch.ones(20))
    torch.testing.assert_close(targets.confidence, targets.probabilities.max(-1).values)


@pytest.fixture(scope="module")
def ner_targets(tmp_path_factory, ner_teachers, ner_data) -> Path:
    out = tmp_path_factory.mktemp("targets") / "ner.safetensors"
    argv = [
        "--task",
        "ner",
        "--teacher",
        *map(str, ner_teachers),
        "--data",
        str(ner_data[0]),
        "--out",
        str(out),
    ]
    assert distill_main(argv) == 0
    return out


def test_train_with_soft_targets_records_the_teachers(
    tmp_path, ner_data, ner_targets, ner_teachers, tiny_backbone, capsys
):
    train_file, dev_file = ner_data
    out = tmp_path / "student"
    argv = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--out", str(out),
            "--backbone", str(tiny_backbone), "--epochs", "1", "--soft-targets", str(ner_targets), *FAST]  # fmt: skip
    assert train_main(argv) == 0
    args = read_json(out, "training_args.json")
    assert args["soft_targets"] == str(ner_targets) and args["distill_weight"] == 0.5
    assert [t["checkpoint"] for t in args["distillation"]["teachers"]] == [str(t) for t in ner_teachers]
    assert args["distillation"]["examples"] == 40 and args["distillation"]["data_files"] == [str(train_file)]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_distill_loss"] > 0
    # (1 - A) * gold + A * distillation, per example averaged over the epoch
    expected = 0.5 * record["train_task_loss"] + 0.5 * record["train_distill_loss"]
    assert record["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_train_refuses_soft_targets_of_other_data(tmp_path, ner_targets, tiny_backbone, capsys):
    other = write_conll(tmp_path / "other.txt", synthetic_ner_examples(40, seed=12))
    argv = ["--task", "ner", "--train", str(other), "--dev", str(other), "--out", str(tmp_path / "s"),
            "--backbone", str(tiny_backbone), "--epochs", "1", "--soft-targets", str(ner_targets)]  # fmt: skip
    assert train_main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --soft-targets {ner_targets}: the soft targets were computed for")
    assert "example 0" in error
    argv[-2:] = ["--distill-weight", "0.3"]
    assert train_main(argv) == 2
    assert "--distill-weight weighs the distillation loss: it needs --soft-targets" in capsys.readouterr().err


def test_resume_with_soft_targets_gives_the_same_weights(tmp_path, ner_data, ner_targets, tiny_backbone):
    train_file, dev_file = ner_data
    common = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--backbone", str(tiny_backbone),
              "--epochs", "2", "--soft-targets", str(ner_targets), "--distill-weight", "0.7", *FAST]  # fmt: skip
    interrupted = assert_resume_matches_straight(common, tmp_path)
    assert read_json(interrupted, "training_args.json")["distill_weight"] == 0.7


def test_max_train_examples_takes_the_targets_first_examples(tmp_path, ner_data, ner_targets, tiny_backbone):
    train_file, dev_file = ner_data
    argv = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--out", str(tmp_path / "s"),
            "--backbone", str(tiny_backbone), "--epochs", "1", "--max-train-examples", "16",
            "--soft-targets", str(ner_targets)]  # fmt: skip
    assert train_main(argv) == 0


# --- unlabelled text -------------------------------------------------------------------------


def test_gold_loss_leaves_out_the_unlabelled_rows(tiny_backbone):
    torch.manual_seed(0)
    model, preprocessor = create_model("ner", NER_LABELS, tiny_backbone)
    model.eval()
    examples = synthetic_ner_examples(3, seed=1)
    texts = [preprocessor.text.encode(e.words) for e in examples]
    batch = {k: torch.from_numpy(v) for k, v in preprocessor.collate(texts, [None] * 3).items()}
    labels = torch.zeros(batch["word_index"].shape, dtype=torch.long)
    for row, example in enumerate(examples):
        labels[row, : len(example.tags)] = torch.tensor([NER_LABELS.index(t) for t in example.tags])
    targets = torch.softmax(torch.randn(*labels.shape, len(NER_LABELS)), -1) * batch["word_mask"].unsqueeze(
        -1
    )
    has_gold = torch.tensor([True, False, True])
    output = model(**batch, labels=labels, soft_targets=targets, has_gold=has_gold, distill_weight=0.25)
    rows = [0, 2]
    gold_only = model(**{k: v[rows] for k, v in batch.items() if k != "pixel_values"},
                      pixel_values=batch["pixel_values"], labels=labels[rows])  # fmt: skip
    torch.testing.assert_close(output.task_loss, gold_only.task_loss)
    torch.testing.assert_close(output.loss, 0.75 * output.task_loss + 0.25 * output.distillation)
    none = model(**batch, labels=labels, soft_targets=targets, has_gold=torch.zeros(3, dtype=torch.bool))
    assert none.task_loss.item() == 0.0 and none.loss.item() == pytest.approx(0.5 * none.distillation.item())


def test_unlabelled_mnre_sentences_distill_and_train(
    tmp_path, ner_teachers, ner_data, ner_targets, tiny_backbone, capsys
):
    train_file, dev_file = ner_data
    mnre = write_mnre(tmp_path / "mnre.txt", synthetic_re_examples(20, seed=8))
    out = tmp_path / "unlabelled.safetensors"
    argv = ["--task", "ner", "--teacher", *map(str, ner_teachers), "--data", str(mnre),
            "--format", "mnre-sentences", "--out", str(out)]  # fmt: skip
    assert distill_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    targets = SoftTargets.load(out)
    assert not targets.labelled and targets.data_format == "mnre-sentences"
    assert len(targets) == len(mnre_sentences(mnre)) == summary["examples"]
    assert 0 < summary["mean_confidence"] <= 1
    student = tmp_path / "student"
    common = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--backbone", str(tiny_backbone),
              "--epochs", "1", *FAST]  # fmt: skip
    argv = [*common, "--out", str(student), "--soft-targets", str(ner_targets),
            "--unlabelled", str(mnre), "--unlabelled-targets", str(out)]  # fmt: skip
    assert train_main(argv) == 0
    recorded = read_json(student, "training_args.json")["distillation"]["unlabelled"]
    assert recorded["examples"] == len(targets) and recorded["data_format"] == "mnre-sentences"
    for change, message in (
        (["--soft-targets", str(ner_targets), "--unlabelled", str(mnre), "--unlabelled-targets", str(ner_targets)],
         "holds targets for labelled files"),
        (["--unlabelled", str(mnre), "--unlabelled-targets", str(out)], "--unlabelled needs --soft-targets"),
        (["--soft-targets", str(ner_targets), "--unlabelled", str(mnre)], "go together"),
        (["--soft-targets", str(out)], "holds targets for unlabelled text"),
    ):  # fmt: skip
        capsys.readouterr()
        assert train_main([*common, "--out", str(tmp_path / "refused"), *change]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error, error
