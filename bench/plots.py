"""PNG plots of the benchmark results (matplotlib, headless).

``plot_e2e`` draws ``bench/run.py``'s results: latency percentiles and throughput against
concurrency, and the per-stage breakdown; ``plot_model`` draws ``bench/model_latency.py``'s:
milliseconds per example against batch size, per backend. Called by those scripts; also on its own
for results already written::

    python bench/plots.py bench/results/e2e/results.json
    python bench/plots.py bench/results/model_minilm.json bench/results/model_bert-base.json --out bench/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Stage colours, shared by every plot.
STAGE_COLOURS = {
    "decode": "#1f77b4",
    "tokenise": "#17becf",
    "queue_wait": "#ff7f0e",
    "inference": "#d62728",
    "other": "#7f7f7f",
    "client": "#c7c7c7",
}
TITLES = {
    "ner-photo": "/ner + 1200x900 JPEG",
    "ner-small": "/ner + 320x240 JPEG",
    "ner-text": "/ner text only",
    "re-image": "/re + 1200x900 JPEG",
}


def _by_scenario(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["scenario"], []).append(row)
    for values in grouped.values():
        values.sort(key=lambda r: r["concurrency"])
    return grouped


def _caption(report: dict[str, Any]) -> str:
    machine = report["machine"]
    shares = [r["other_processes_cpu_share"] for r in report["levels"] if "other_processes_cpu_share" in r]
    busy = f", other processes {100 * min(shares):.0f}-{100 * max(shares):.0f} % CPU" if shares else ""
    names = ", ".join(
        f"{b['name']} {b['precision']}" + (" (random weights)" if b.get("fallback") else "")
        for b in report["bundles"].values()
        if b
    )
    return (
        f"{report['created']}; {machine['cpu']}, {machine['cores']} cores, load "
        f"{machine['load_average_before'][0]:.1f}->{machine['load_average_after'][0]:.1f}{busy}; {names}"
    )


def _save_captioned(fig, title: str, fontsize: int, caption: str, path: Path) -> Path:
    """Title, the run's caption along the bottom, then the PNG at ``path``; closes the figure."""
    fig.suptitle(title, fontsize=fontsize)
    fig.text(0.5, 0.005, caption, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(report: dict[str, Any], out: Path) -> list[Path]:
    """latency.png, throughput.png and stages.png in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    grouped = _by_scenario([r for r in report["levels"] if r["ok"]])
    caption = _caption(report)
    written = []

    # Latency percentiles against concurrency, one panel per workload.
    count = len(grouped)
    columns = 2 if count == 4 else count
    rows_of_panels = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows_of_panels,
        columns,
        figsize=(4.6 * columns, 3.6 * rows_of_panels + 0.6),
        squeeze=False,
        sharey=True,
    )
    panels = [axis for row in axes for axis in row]
    for axis in panels[count:]:
        axis.set_visible(False)
    for axis, (scenario, rows) in zip(panels, grouped.items()):
        levels = [r["concurrency"] for r in rows]
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            axis.plot(levels, [r[key] for r in rows], style, label=key.split("_")[0])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(levels, [str(v) for v in levels])
        axis.set_title(TITLES.get(scenario, scenario), fontsize=10)
        axis.set_xlabel("concurrency")
        axis.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("latency, ms (client side)")
    axes[0][0].legend()
    written.append(_save_captioned(fig, "IMM service: latency percentiles", 11, caption, out / "latency.png"))

    # Throughput against concurrency, and the mean server batch size.
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for scenario, rows in grouped.items():
        levels = [r["concurrency"] for r in rows]
        left.plot(levels, [r["throughput_rps"] for r in rows], "o-", label=TITLES.get(scenario, scenario))
        right.plot(
            levels, [r["mean_batch_size"] or 0 for r in rows], "o-", label=TITLES.get(scenario, scenario)
        )
    for axis, label in ((left, "throughput, requests/s"), (right, "mean batch size (server)")):
        axis.set_xscale("log", base=2)
        levels = sorted({r["concurrency"] for r in report["levels"]})
        axis.set_xticks(levels, [str(v) for v in levels])
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    written.append(
        _save_captioned(fig, "IMM service: throughput and batching", 11, caption, out / "throughput.png")
    )

    # Per-stage breakdown: stacked mean ms per request, one bar per workload and concurrency.
    bars, labels = [], []
    for scenario, rows in grouped.items():
        for row in rows:
            stages = {k: v["mean_ms"] for k, v in row["stages"].items()}
            if "total" not in stages:
                continue
            known = {k: stages.get(k, 0.0) for k in ("decode", "tokenise", "queue_wait", "inference")}
            known["other"] = max(0.0, stages["total"] - sum(known.values()))
            known["client"] = max(0.0, (row["mean_ms"] or 0.0) - stages["total"])
            bars.append(known)
            labels.append(f"{scenario}\nc={row['concurrency']}")
    if bars:
        fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.7 * len(bars) + 3), 5), sharex=True)
        for axis, relative in zip(axes, (False, True)):
            bottoms = [0.0] * len(bars)
            for stage, colour in STAGE_COLOURS.items():
                values = [b[stage] for b in bars]
                if relative:
                    values = [100 * v / max(1e-9, sum(b.values())) for v, b in zip(values, bars)]
                axis.bar(range(len(bars)), values, bottom=bottoms, color=colour, label=stage)
                bottoms = [b + v for b, v in zip(bottoms, values)]
            axis.set_xticks(range(len(bars)), labels, rotation=90, fontsize=7)
            axis.set_ylabel("% of the client latency" if relative else "mean ms per request")
            axis.grid(True, axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        title = (
            "Where a request's time goes (server's imm_stage_seconds, mean per request)\n"
            "inference: the batch's call (collate, ONNX Runtime, CRF); other: server total - stages\n"
            "(HTTP, multipart, hand-offs); client: client latency - server total"
        )
        written.append(_save_captioned(fig, title, 9, caption, out / "stages.png"))
    return written


def plot_model(reports: list[dict[str, Any]], path: Path) -> Path:
    """Milliseconds per example (p50 of the call / batch) against batch size, one panel per model."""
    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.2), squeeze=False)
    for axis, report in zip(axes[0], reports):
        backends: dict[str, list[tuple[int, float]]] = {}
        for row in report["latency"]:
            backends.setdefault(row["backend"], []).append(
                (row["batch_size"], row["p50_ms"] / row["batch_size"])
            )
        for backend, points in backends.items():
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=backend)
        sizes = sorted({row["batch_size"] for row in report["latency"]})
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("batch size")
        axis.set_ylabel("ms per example (p50 of a call / batch)")
        config, machine, settings = report["config"], report["machine"], report["settings"]
        axis.set_title(
            f"{report['checkpoint']} ({config['hidden_size']} wide, {config['layers']})\n"
            f"{settings['seq_len']} tokens, {settings['image_fraction']:.0%} with image, "
            f"{settings['threads']} threads, load {machine['load_average_before'][0]:.1f}",
            fontsize=9,
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Model-only latency (graph alone, CPU)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON of run.py or model_latency.py")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: beside the first JSON)")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
    out = args.out or args.results[0].parent
    model_reports = [r for r in reports if "latency" in r]
    for report in reports:
        if "levels" in report:
            for path in plot_e2e(report, out):
                print(f"written {path}")
    if model_reports:
        print(f"written {plot_model(model_reports, out / 'model_latency.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
