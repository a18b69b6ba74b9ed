"""The fixed cost of one NER call, per stage: CPU time of each step of a one-by-one call, one thread.

The stages are the engine's own steps for one tweet, timed in the same process and interleaved
call by call with the whole API call (``imm.load(...).ner(text)``), on valid tweets (tokens joined
by spaces, text only)::

    python bench/call_stages.py --bundle weights/ner --tweets 300

- tokenise: ``NERPipeline.prepare`` (word split, word pieces);
- collate: ``Preprocessor.collate`` of the one example;
- model: the graph on ONNX Runtime (``OnnxRuntime.run``);
- CRF decode: Viterbi and marginals in numpy (``export.outputs.decode_outputs``);
- answer: entities with character offsets and scores (``NERPipeline.decode``);
- around: the API call's CPU time less the stages above (the engine's queue and batcher, the
  event-loop hand-offs, the response object).

The last line counts the API calls preprocessed on the engine's event loop rather than in its pool
(``Engine.prepared_here``: a lone call of a short text).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "weights" / "ner")
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "twitter2017" / "valid.txt"
    )
    parser.add_argument("--tweets", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from common import cpu_name

    import imm
    from engine.pipeline import NERPipeline
    from engine.runtimes import create_runtime
    from engine.settings import Settings
    from export.bundle import load_bundle
    from export.outputs import decode_outputs
    from model.data import read_twitter_conll
    from model.preprocessing import Preprocessor, load_tokenizer

    texts = [" ".join(e.words) for e in read_twitter_conll(args.data)[: args.tweets]]
    bundle = load_bundle(args.bundle)
    preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
    runtime = create_runtime(bundle, preprocessor, Settings(intra_op_threads=1))
    pipeline = NERPipeline(bundle, preprocessor, runtime)
    nlp = imm.load(ner=str(args.bundle), re="", intra_op_threads=1)
    stages = ("tokenise", "collate", "model", "CRF decode", "answer", "API call")
    cpu: dict[str, list[float]] = {stage: [] for stage in stages}
    clock = time.process_time
    try:
        for text in texts[:20]:  # warm-up
            nlp.ner(text)
        for _ in range(args.rounds):
            for text in texts:
                t0 = clock()
                prepared = pipeline.prepare(text, None)
                t1 = clock()
                arrays = preprocessor.collate([prepared.encoded], [None])
                t2 = clock()
                emissions = runtime.run(arrays)
                t3 = clock()
                output = decode_outputs("ner", emissions, arrays["word_mask"], bundle.crf)
                t4 = clock()
                pipeline.decode([prepared], output)
                t5 = clock()
                nlp.ner(text)
                t6 = clock()
                for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                    cpu[stage].append(1000 * seconds)
        prepared_here = nlp._async.engine.prepared_here
    finally:
        nlp.close()
    means = {stage: statistics.fmean(values) for stage, values in cpu.items()}
    parts = sum(means[stage] for stage in stages[:-1])
    print(
        f"{len(texts)} tweets of {args.data} x {args.rounds} rounds, one by one, one thread, {args.bundle}, "
        f"{cpu_name()} ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}; CPU ms per tweet:\n"
    )
    print("| stage | mean CPU ms | median | share of the API call |\n|---|---:|---:|---:|")
    for stage in stages[:-1]:
        print(
            f"| {stage} | {means[stage]:.3f} | {statistics.median(cpu[stage]):.3f} | "
            f"{means[stage] / means['API call']:.0%} |"
        )
    around = means["API call"] - parts
    print(f"| around (engine, API) | {around:.3f} | | {around / means['API call']:.0%} |")
    print(
        f"| **API call** (nlp.ner) | {means['API call']:.3f} | {statistics.median(cpu['API call']):.3f} | 100% |"
    )
    calls = len(texts[:20]) + args.rounds * len(texts)
    print(f"\nAPI calls preprocessed on the engine's event loop: {prepared_here} of {calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
