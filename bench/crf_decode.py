"""CPU of the numpy CRF decoding (Viterbi + marginals, as the server runs it) against another
revision's ``model/decoding.py``, in one process, interleaved rounds::

    python bench/crf_decode.py --vs 9a36856          # the log-space loops before the cut

Random scores over 9 tags (NER's B/I x 4 types + O); the paths of both are checked equal first.
Prints CPU ms per call, the median of the rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def revision_module(revision: str):
    """``model/decoding.py`` as it was at ``revision``, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:model/decoding.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="crf-decode-") as directory:
        path = Path(directory) / "decoding_at_revision.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("decoding_at_revision", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", required=True, help="git revision whose model/decoding.py to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    from model import decoding as current

    other = revision_module(args.vs)
    rng = np.random.default_rng(0)
    tags = 9
    scores = [rng.normal(size=(tags, tags)), rng.normal(size=tags), rng.normal(size=tags)]

    def decode(module, emissions, mask):
        paths = module.viterbi_decode(emissions, mask, *scores)
        module.crf_marginals(emissions, mask, *scores)
        return paths

    print(f"| rows x words | {args.vs} | now | ratio |\n|---|---:|---:|---:|")
    for rows, words in ((1, 12), (1, 24), (16, 24)):
        emissions = (3 * rng.normal(size=(rows, words, tags))).astype(np.float32)
        mask = np.ones((rows, words), bool)
        mask[1:, words // 2 :] = False  # half of the rows padded to the batch's length
        if decode(other, emissions, mask) != decode(current, emissions, mask):
            raise SystemExit(f"the paths differ at {rows} x {words}")
        times: dict[str, list[float]] = {"other": [], "now": []}
        for _ in range(args.rounds):
            for name, module in (("other", other), ("now", current)):
                started = time.process_time()
                for _ in range(args.calls):
                    decode(module, emissions, mask)
                times[name].append((time.process_time() - started) / args.calls * 1e3)
        before, after = statistics.median(times["other"]), statistics.median(times["now"])
        print(f"| {rows} x {words} | {before:.3f} | {after:.3f} | {before / after:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
