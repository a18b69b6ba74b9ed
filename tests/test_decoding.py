"""CRF decoding against brute force and pytorch-crf, BIO spans against seqeval, character spans.

The numpy twin (``model.decoding``) and the torch ``model.crf.CRF`` are both held to pytorch-crf's decode.
"""

from __future__ import annotations

import itertools
import random
import warnings

import numpy as np
import pytest

from model.decoding import bio_spans, char_spans, crf_marginals, viterbi_decode


def random_crf(rng: np.random.Generator, batch: int, words: int, tags: int):
    emissions = rng.normal(size=(batch, words, tags))
    lengths = rng.integers(1, words + 1, size=batch)
    lengths[0] = words  # at least one full row, so padding is never the whole batch's width
    mask = np.arange(words)[None, :] < lengths[:, None]
    return emissions, mask, rng.normal(size=(tags, tags)), rng.normal(size=tags), rng.normal(size=tags)


def path_score(emissions, path, transitions, start, end) -> float:
    """pytorch-crf's score of one tag path over one row's real words."""
    score = start[path[0]] + end[path[-1]] + sum(emissions[i, tag] for i, tag in enumerate(path))
    return score + sum(transitions[a, b] for a, b in itertools.pairwise(path))


def all_paths(length: int, tags: int):
    return list(itertools.product(range(tags), repeat=length))


@pytest.mark.parametrize("seed", range(20))
def test_viterbi_and_marginals_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_tags = 3
    emissions, mask, transitions, start, end = random_crf(
        rng, batch=4, words=int(rng.integers(1, 5)), tags=num_tags
    )
    decoded = viterbi_decode(emissions, mask, transitions, start, end)
    marginals = crf_marginals(emissions, mask, transitions, start, end)
    for row in range(len(mask)):
        length = int(mask[row].sum())
        paths = all_paths(length, num_tags)
        scores = np.array([path_score(emissions[row], p, transitions, start, end) for p in paths])
        assert decoded[row] == list(paths[int(scores.argmax())])
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        expected = np.zeros((mask.shape[1], num_tags))
        for path, probability in zip(paths, probabilities):
            for i, tag in enumerate(path):
                expected[i, tag] += probability
        np.testing.assert_allclose(marginals[row], expected, atol=1e-10)


def test_marginals_sum_to_one_on_words_and_zero_on_padding():
    rng = np.random.default_rng(1)
    emissions, mask, transitions, start, end = random_crf(rng, batch=8, words=12, tags=9)
    emissions *= 30  # large scores: would overflow without log-space arithmetic
    marginals = crf_marginals(emissions, mask, transitions, start, end)
    assert marginals.shape == emissions.shape
    np.testing.assert_allclose(marginals.sum(-1), mask.astype(float), atol=1e-9)
    assert np.all(marginals >= 0) and np.isfinite(marginals).all()


def test_forbidden_transitions_get_zero_probability_and_are_never_decoded():
    rng = np.random.default_rng(2)
    emissions, mask, transitions, start, end = random_crf(rng, batch=5, words=6, tags=3)
    transitions[0, 1] = -np.inf  # e.g. O -> I-X in a constrained BIO CRF
    start[1] = -np.inf
    decoded = viterbi_decode(emissions, mask, transitions, start, end)
    marginals = crf_marginals(emissions, mask, transitions, start, end)
    assert np.isfinite(marginals).all()
    np.testing.assert_allclose(marginals.sum(-1), mask.astype(float), atol=1e-9)
    assert np.all(marginals[:, 0, 1] == 0)
    for path in decoded:
        assert path[0] != 1 and all((a, b) != (0, 1) for a, b in itertools.pairwise(path))


@pytest.mark.parametrize("seed", range(5))
def test_viterbi_equals_pytorch_crf_with_padding(seed):
    torch = pytest.importorskip("torch")
    torchcrf = pytest.importorskip("torchcrf")
    rng = np.random.default_rng(100 + seed)
    emissions, mask, transitions, start, end = random_crf(rng, batch=16, words=11, tags=9)
    crf = torchcrf.CRF(9, batch_first=True).double()
    with torch.no_grad():
        crf.transitions.copy_(torch.from_numpy(transitions))
        crf.start_transitions.copy_(torch.from_numpy(start))
        crf.end_transitions.copy_(torch.from_numpy(end))
    expected = crf.decode(torch.from_numpy(emissions), mask=torch.from_numpy(mask))
    assert viterbi_decode(emissions, mask, transitions, start, end) == expected
    # float32 inputs (as ONNX Runtime returns them) decode the same.
    assert viterbi_decode(emissions.astype(np.float32), mask, transitions, start, end) == expected


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_torch_crf_viterbi_equals_pytorch_crf_decode(seed, batch_first):
    """``model.crf.CRF``'s batched Viterbi against pytorch-crf's own decode, on ragged masks."""
    torch = pytest.importorskip("torch")
    torchcrf = pytest.importorskip("torchcrf")
    from model.crf import CRF

    torch.manual_seed(seed)
    plain = torchcrf.CRF(7, batch_first=batch_first)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.normal_()
    ours = CRF(7, batch_first=batch_first)
    ours.load_state_dict(plain.state_dict())
    emissions = torch.randn(12, 10, 7) * 2
    lengths = torch.randint(1, 11, (12,))
    lengths[0] = 10
    mask = torch.arange(10)[None] < lengths[:, None]
    if not batch_first:
        emissions, mask = emissions.transpose(0, 1), mask.transpose(0, 1)
    expected = plain.decode(emissions, mask=mask)
    assert ours.decode(emissions, mask=mask) == expected  # pytorch-crf's own decode, inherited
    found = ours.viterbi(emissions, mask)
    tags, confidence = ours.decode_batch(emissions, mask)
    assert torch.equal(tags, found) and found.shape == mask.shape == confidence.shape
    if not batch_first:
        found, mask, confidence = found.T, mask.T, confidence.T
    assert [row[:n] for row, n in zip(found.tolist(), lengths.tolist(), strict=True)] == expected
    assert not found[~mask].any() and not confidence[~mask].any()
    assert ((confidence[mask] > 0) & (confidence[mask] <= 1 + 1e-6)).all()


def test_torch_crf_equals_the_numpy_twin_in_float64():
    torch = pytest.importorskip("torch")
    from model.crf import CRF

    rng = np.random.default_rng(7)
    emissions, mask, transitions, start, end = random_crf(rng, batch=9, words=8, tags=5)
    crf = CRF.from_scores(*(torch.from_numpy(s) for s in (transitions, start, end))).double()
    assert crf.transitions.dtype == torch.float64 and not crf.transitions.requires_grad
    found = crf.viterbi(torch.from_numpy(emissions), torch.from_numpy(mask))
    lengths = mask.sum(axis=1)
    paths = [row[:n] for row, n in zip(found.tolist(), lengths.tolist(), strict=True)]
    assert paths == viterbi_decode(emissions, mask, transitions, start, end)
    marginals = crf.marginals(torch.from_numpy(emissions), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(marginals, crf_marginals(emissions, mask, transitions, start, end), atol=1e-10)


def test_torch_crf_loads_a_plain_pytorch_crf_state_dict():
    """Checkpoints saved with ``torchcrf.CRF`` (``head.crf.transitions``, ...) load into ``model.crf.CRF``."""
    torch = pytest.importorskip("torch")
    torchcrf = pytest.importorskip("torchcrf")
    from model.crf import CRF

    torch.manual_seed(3)
    plain = torchcrf.CRF(6, batch_first=True)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.normal_()
    head = torch.nn.Module()
    head.crf = plain
    saved = head.state_dict()
    assert set(saved) == {"crf.transitions", "crf.start_transitions", "crf.end_transitions"}
    ours = torch.nn.Module()
    ours.crf = CRF(6, batch_first=True)
    ours.load_state_dict(saved)  # strict: same names, same shapes, nothing more
    assert set(ours.state_dict()) == set(saved)
    for key, value in saved.items():
        assert torch.equal(ours.state_dict()[key], value)
    # The likelihood (the training loss) is pytorch-crf's, unchanged.
    emissions = torch.randn(4, 5, 6)
    tags = torch.randint(0, 6, (4, 5))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4, [1] * 4 + [0]], dtype=torch.bool)
    for reduction in ("none", "mean"):
        torch.testing.assert_close(
            ours.crf(emissions, tags, mask=mask, reduction=reduction),
            plain(emissions, tags, mask=mask, reduction=reduction),
        )


def test_viterbi_single_word_rows_and_empty_batch():
    emissions = np.array([[[0.0, 2.0], [9.0, 0.0]]])
    mask = np.array([[True, False]])
    assert viterbi_decode(emissions, mask, np.zeros((2, 2)), np.zeros(2), np.array([0.0, -5.0])) == [[0]]
    no_rows = (np.zeros((0, 3, 2)), np.zeros((0, 3), bool), np.zeros((2, 2)), np.zeros(2), np.zeros(2))
    assert viterbi_decode(*no_rows) == []
    assert crf_marginals(*no_rows).shape == (0, 3, 2)


@pytest.mark.parametrize(
    "mask",
    [
        [[False, True, True]],  # does not start with a word
        [[True, False, True]],  # not contiguous
    ],
)
def test_bad_masks_are_refused(mask):
    with pytest.raises(ValueError, match="mask"):
        viterbi_decode(np.zeros((1, 3, 2)), np.array(mask), np.zeros((2, 2)), np.zeros(2), np.zeros(2))


def seqeval_spans(tags):
    from seqeval.metrics.sequence_labeling import get_entities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about the odd tags on purpose in the test below
        return [(type_, start, end + 1) for type_, start, end in get_entities(list(tags))]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        (["I-PER", "I-PER"], [("PER", 0, 2)]),  # I- at the start begins an entity
        (["O", "I-LOC", "O"], [("LOC", 1, 2)]),  # I- after O
        (["B-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),  # I-X after B-Y
        (["B-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
        (["B", "I", "O", "I"], [("_", 0, 2), ("_", 3, 4)]),  # no type
        ([], []),
    ],
)
def test_bio_spans_examples(tags, expected):
    assert bio_spans(tags) == expected
    assert seqeval_spans(tags) == expected


def test_bio_spans_equal_seqeval_on_random_sequences():
    rng = random.Random(0)
    iob2 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    # Tags seqeval's code gives a meaning to: no type, other schemes' E-/S-, "." and oddly split types.
    odd = ["B", "I", "O", "E-PER", "S-LOC", "E", "S", ".", "I-PER-X", "B-", "BPER", "X-PER", "O-PER"]
    for _ in range(3000):
        tags = [rng.choice(iob2) for _ in range(rng.randint(0, 10))]
        assert bio_spans(tags) == seqeval_spans(tags), tags
    for _ in range(3000):
        tags = [rng.choice(iob2 + odd) for _ in range(rng.randint(0, 8))]
        assert bio_spans(tags) == seqeval_spans(tags), tags


def test_char_spans_cover_first_to_last_word():
    text = "Kevin Durant joins the Golden State Warriors !"
    offsets = [(0, 5), (6, 12), (13, 18), (19, 22), (23, 29), (30, 35), (36, 44), (45, 46)]
    spans = char_spans([("PER", 0, 2), ("ORG", 4, 7), ("MISC", 7, 8)], offsets)
    assert spans == [("PER", 0, 12), ("ORG", 23, 44), ("MISC", 45, 46)]
    assert [text[s:e] for _, s, e in spans] == ["Kevin Durant", "Golden State Warriors", "!"]
    assert char_spans([], offsets) == []
    with pytest.raises(ValueError):
        char_spans([("PER", 7, 9)], offsets)


def test_marginals_where_every_path_underflows_exp_equal_the_log_space_ones():
    """Scores a thousand apart: in probability space every path of the first row is 0 (the decoder
    rescales each step, yet ``exp(-1000)`` is 0 in float64); that row is redone in log space, the
    other row of the batch keeps the fast path, and both equal the torch CRF in float64."""
    torch = pytest.importorskip("torch")
    from model.crf import CRF

    emissions = np.array([[[0.0, -1000.0], [-1000.0, 0.0], [0.0, 0.0]], [[0.5, 0.1], [0.2, 0.3], [0.0, 0.0]]])
    mask = np.array([[True, True, False], [True, True, True]])
    transitions = np.array([[0.0, -1000.0], [0.0, 0.0]])
    start, end = np.zeros(2), np.zeros(2)
    ours = crf_marginals(emissions, mask, transitions, start, end)
    crf = CRF.from_scores(*(torch.from_numpy(s) for s in (transitions, start, end))).double()
    theirs = crf.marginals(torch.from_numpy(emissions), torch.from_numpy(mask)).numpy()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    np.testing.assert_allclose(ours.sum(axis=2), mask.astype(float), atol=1e-12)


def test_marginals_of_a_row_do_not_depend_on_its_padding():
    """A row's marginals are bit-identical alone and padded to any length beside longer rows (the
    server's promise: an answer does not depend on its batch-mates)."""
    rng = np.random.default_rng(3)
    transitions, start, end = rng.normal(size=(5, 5)), rng.normal(size=5), rng.normal(size=5)
    row = rng.normal(size=(1, 11, 5)).astype(np.float32)
    alone = crf_marginals(row, np.ones((1, 11), bool), transitions, start, end)
    for padded_to in (12, 17, 24, 40):
        emissions = rng.normal(size=(3, padded_to, 5)).astype(np.float32)
        emissions[1, :11] = row[0]
        mask = np.ones((3, padded_to), bool)
        mask[1, 11:] = False
        batch = crf_marginals(emissions, mask, transitions, start, end)
        assert np.array_equal(batch[1, :11], alone[0]), padded_to
        assert (
            viterbi_decode(emissions, mask, transitions, start, end)[1]
            == viterbi_decode(row, np.ones((1, 11), bool), transitions, start, end)[0]
        )
