"""The recipe search behind the default models (weights/MODEL_CARD.md): runs ``python -m model.train``
once per named recipe, one after another, and records what each gave.

Each run writes its checkpoint to ``RUNS/<name>`` and appends one JSON line to
``RUNS/search.jsonl``: the recipe's flags, its valid F1 per epoch and per dev file, the averaged
weights' scores (``--average-last``), the best, and the wall time. A run already recorded is
skipped, so the search resumes where it stopped. ``--table`` prints the Markdown table of the
model card from that file.

    python bench/recipe_search.py --plan ner --runs runs/search      # or re, re-init (needs ner_best)
    python bench/recipe_search.py --runs runs/search --table

Selection uses the valid splits only; the test splits are never read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from model.run_directory import live_generation

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DATA", ROOT.parent / "shared" / "data"))

NER_DATA = [
    "--task", "ner",
    "--train", str(DATA / "twitter2015/train.txt"), str(DATA / "twitter2017/train.txt"),
    "--dev", str(DATA / "twitter2015/valid.txt"), str(DATA / "twitter2017/valid.txt"),
]  # fmt: skip
RE_DATA = [
    "--task", "re", "--train", str(DATA / "mnre/train.txt"), "--dev", str(DATA / "mnre/valid.txt"),
    "--re-pooling", "entity_start",
]  # fmt: skip

# name -> the flags that differ from the common ones (batch 16, seed 42, the CLI's defaults otherwise)
PLANS: dict[str, dict[str, list[str]]] = {
    "ner": {
        "ner-e6-lr1e-4": ["--epochs", "6", "--lr", "1e-4", "--average-last", "3"],
        "ner-e10-lr1e-4": ["--epochs", "10", "--lr", "1e-4", "--average-last", "3"],
        "ner-e6-lr5e-5": ["--epochs", "6", "--lr", "5e-5", "--average-last", "3"],
        "ner-e6-lr2e-4": ["--epochs", "6", "--lr", "2e-4", "--average-last", "3"],
        "ner-e6-lr1e-4-head1e-3": [
            "--epochs",
            "6",
            "--lr",
            "1e-4",
            "--head-lr",
            "1e-3",
            "--average-last",
            "3",
        ],
        "ner-e6-lr1e-4-warm0": [
            "--epochs",
            "6",
            "--lr",
            "1e-4",
            "--warmup-ratio",
            "0",
            "--average-last",
            "3",
        ],
        # An embedding of each word's casing beside its state (the default backbone is uncased).
        "ner-e6-lr1e-4-shape16": [
            "--epochs",
            "6",
            "--lr",
            "1e-4",
            "--word-shape-size",
            "16",
            "--average-last",
            "3",
        ],
    },
    "re": {
        "re-e6-lr1e-4": ["--epochs", "6", "--lr", "1e-4", "--average-last", "3"],
        "re-e6-lr5e-5": ["--epochs", "6", "--lr", "5e-5", "--average-last", "3"],
        "re-e10-lr1e-4": ["--epochs", "10", "--lr", "1e-4", "--average-last", "3"],
        "re-e6-lr2e-4": ["--epochs", "6", "--lr", "2e-4", "--average-last", "3"],
    },
}


def run_recipe(name: str, flags: list[str], base: list[str], runs: Path, seed: int) -> dict:
    out = runs / name
    command = [sys.executable, "-m", "model.train", *base, "--out", str(out), "--batch-size", "16",
               "--seed", str(seed), *flags]  # fmt: skip
    # A committed generation (or the older layout's state): continue it.
    if live_generation(out) is not None or (out / "training_state").exists():
        command.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    started = time.time()
    with open(runs / f"{name}.log", "a", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not (out / "metrics.jsonl").is_file():
        raise SystemExit(f"{name} failed (exit status {result.returncode}): see {runs / f'{name}.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if isinstance(row["epoch"], int)]
    averaged = next((row for row in rows if not isinstance(row["epoch"], int)), None)
    best = max(epochs, key=lambda row: row["dev_f1"])
    return {
        "name": name,
        "flags": flags,
        "seed": seed,
        "returncode": result.returncode,
        "wall_seconds": round(time.time() - started),
        "train_seconds": round(sum(row["train_seconds"] for row in epochs)),
        "dev_f1_per_epoch": [round(row["dev_f1"] * 100, 2) for row in epochs],
        "dev_per_file": {Path(k).parent.name: round(v["f1"] * 100, 2) for k, v in best["dev"].items()},
        "best_epoch": best["epoch"],
        "best_dev_f1": round(best["dev_f1"] * 100, 2),
        "averaged": None
        if averaged is None
        else {
            "epochs": averaged["epochs"],
            "dev_f1": round(averaged["dev_f1"] * 100, 2),
            "dev_per_file": {
                Path(k).parent.name: round(v["f1"] * 100, 2) for k, v in averaged["dev"].items()
            },
        },
    }


def table(records: list[dict]) -> str:
    lines = [
        "| run | seed | settings (beside batch 16) | valid F1 per epoch | best epoch: F1 (per file) | mean of last epochs | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        per_file = ", ".join(f"{k} {v}" for k, v in r["dev_per_file"].items())
        avg = "-"
        if r["averaged"]:
            files = ", ".join(f"{k} {v}" for k, v in r["averaged"]["dev_per_file"].items())
            avg = f"{r['averaged']['epochs'][0]}-{r['averaged']['epochs'][-1]}: {r['averaged']['dev_f1']} ({files})"
        lines.append(
            f"| {r['name']} | {r['seed']} | `{' '.join(r['flags'])}` | {' / '.join(map(str, r['dev_f1_per_epoch']))} "
            f"| {r['best_epoch']}: {r['best_dev_f1']} ({per_file}) | {avg} | {r['train_seconds'] / 60:.0f} min |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), help="which set of recipes to run")
    parser.add_argument("--only", nargs="+", help="run only these recipes of the plan")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--init-from", help="add --init-from DIR to every recipe (cross-task initialisation)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "search")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the recorded runs")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    results = args.runs / "search.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if args.table:
        print(table(records))
        return 0
    if not args.plan:
        parser.error("--plan or --table is needed")
    base = NER_DATA if args.plan == "ner" else RE_DATA
    done = {(r["name"], r["seed"]) for r in records}
    for name, flags in PLANS[args.plan].items():
        if args.only and name not in args.only:
            continue
        if args.init_from:
            name, flags = f"{name}-init", [*flags, "--init-from", args.init_from]
        for seed in args.seeds:
            run_name = name if seed == 42 else f"{name}-s{seed}"
            if (run_name, seed) in done:
                continue
            record = run_recipe(run_name, flags, base, args.runs, seed)
            with open(results, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
