"""A bench run's results folder: ``results.json`` (everything), ``results.md`` (one row per method
and budget) and three plots: ``accuracy_vs_bytes.png``, ``pareto_bits.png`` (accuracy and KL
against bits per element, each method and budget a point, the frontier drawn) and
``decode_speed.png``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from kvmem.bench.run import BenchResult
from kvmem.errors import format_bytes

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
ACCURACY_PNG, SPEED_PNG, PARETO_PNG = "accuracy_vs_bytes.png", "decode_speed.png", "pareto_bits.png"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return mean(finite) if finite else math.nan


def summarize(result: BenchResult) -> list[dict[str, object]]:
    """One row per (method, budget), in run order: means over every question of every context."""
    groups: dict[tuple[str, float | None], list] = defaultdict(list)
    for r in result.records:
        groups[(r.method, r.budget)].append(r)
    tasks = list(dict.fromkeys(r.task for r in result.records))
    rows = []
    for (method, budget), records in groups.items():
        ok = [r for r in records if r.error is None]
        row: dict[str, object] = {"method": method, "budget": budget}
        if not ok:
            row["error"] = records[0].error
            rows.append(row)
            continue
        for task in tasks:
            scored = [r.score for r in ok if r.task == task and r.score is not None]
            row[task] = _mean([float(s) for s in scored]) if scored else None
        retrieval = [float(r.score) for r in ok if r.score is not None]
        row["accuracy"] = _mean(retrieval) if retrieval else None
        row["gold_logprob"] = _mean([r.gold_logprob for r in ok if r.score is not None])
        texts = [r for r in ok if r.ppl is not None]
        row["ppl"] = _mean([r.ppl for r in texts]) if texts else None
        row["kl"] = _mean([r.kl for r in texts if r.kl is not None]) if texts else None
        row["kv_bytes"] = _mean([float(r.kv_bytes) for r in ok])
        row["kv_ratio"] = _mean([r.kv_ratio for r in ok])
        row["prefill_s"] = _mean([r.prefill_s for r in ok])
        row["ttft_s"] = _mean([r.ttft_s for r in ok])
        row["decode_tokens_per_s"] = _mean([r.decode_tokens_per_s for r in ok])
        row["peak_rss"] = max(r.peak_rss for r in ok)
        rows.append(row)
    return rows


def bits_per_element(row: dict[str, object], dtype_bits: float) -> float | None:
    """A summary row's bits per element of the context: every byte held over the full cache's
    elements (its share of the full cache's bytes times the model dtype's bits)."""
    ratio = row.get("kv_ratio")
    return ratio * dtype_bits if isinstance(ratio, float) and not math.isnan(ratio) else None


def frontier(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The Pareto frontier of (bits, value) points: those no other point beats with as few bits or
    fewer, in increasing bits."""
    best: list[tuple[float, float]] = []
    for bits, value in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not best or (value > best[-1][1] if higher_is_better else value < best[-1][1]):
            best.append((bits, value))
    return best


def _dtype_bits(result: BenchResult) -> float:
    # results written before it was recorded: float32
    return float(str(result.environment.get("dtype_bits", 32)))


def _fmt(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: BenchResult) -> str:
    rows = summarize(result)
    tasks = [t for t in dict.fromkeys(r.task for r in result.records) if t != "realtext"]
    c = result.config
    head = ["method", "budget", *tasks, "accuracy", "gold logprob", "ppl", "KL", "KV held", "ratio"]
    head += ["bits/el"]  # bits per element of the context: every byte held over the full cache's elements
    head += ["TTFT s", "decode tok/s", "peak RSS"]
    env = result.environment
    dtype_bits = _dtype_bits(result)
    lines = [
        f"model `{c.model}`, {c.length}-token prompts, mode `{c.mode}`, {c.contexts} context(s) per task, "
        f"seed {c.seed}; {env.get('threads')} threads, torch {env.get('torch')}, {env.get('seconds')} s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        budget = row["budget"]
        cells = [f"`{row['method']}`", "-" if budget is None else f"{budget:.0%}"]
        if "error" in row:
            lines.append(
                "| " + " | ".join(cells + [f"refused: {row['error']}"] + [""] * (len(head) - 3)) + " |"
            )
            continue
        cells += [_fmt(row.get(t)) for t in tasks]
        cells += [_fmt(row["accuracy"]), _fmt(row["gold_logprob"]), _fmt(row["ppl"]), _fmt(row["kl"], 3)]
        kv = row["kv_bytes"]
        cells += [format_bytes(int(kv)) if isinstance(kv, float) and not math.isnan(kv) else "-"]
        cells += [_fmt(row["kv_ratio"]), _fmt(bits_per_element(row, dtype_bits))]
        cells += [_fmt(row["ttft_s"]), _fmt(row["decode_tokens_per_s"], 1)]
        cells += [format_bytes(int(row["peak_rss"]))]  # type: ignore[call-overload]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _style(i: int, method: str) -> dict[str, Any]:
    """The i-th line's look: 20 distinct colours (the default cycle repeats after 10 methods),
    dashed for peers (``hf*``, ``kvpress:*``) so they stand apart from kvmem's own methods."""
    import matplotlib

    peer = method.startswith(("hf", "kvpress:"))
    return {
        "color": matplotlib.colormaps["tab20"](i % 20),
        "marker": "os^Dv"[i % 5],
        "linestyle": "--" if peer else "-",
    }


def plot(result: BenchResult, out: Path) -> list[Path]:
    """Accuracy (or gold log-probability when there is no retrieval task) vs KV bytes, one line per
    method; decode tokens/s vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(result) if "error" not in r]
    # exact match is coarse (a small model often fails every needle even with the full cache):
    # the gold answer's log-probability beside it shows what compression costs
    metrics = [m for m in ("accuracy", "gold_logprob") if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(6.5 * max(1, len(metrics)), 4.5), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics):
        by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in rows:
            value = row.get(metric)
            if isinstance(value, float) and not math.isnan(value):
                by_method[str(row["method"])].append((float(row["kv_bytes"]) / 2**20, value))  # type: ignore[arg-type]
        for i, (method, points) in enumerate(by_method.items()):
            points.sort()
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=method, **_style(i, method))
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes held (MiB, log scale)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{result.config.model}: {metric.replace('_', ' ')} vs physical KV bytes")
        ax.grid(True, alpha=0.3)
        if by_method:
            ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / ACCURACY_PNG]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    paths.append(_pareto(result, rows, out / PARETO_PNG))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    speeds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for point in result.speed:
        label = point.method if point.budget is None else f"{point.method} {point.budget:.0%}"
        speeds[label].append((point.context_tokens, point.decode_tokens_per_s))
    for i, (label, points) in enumerate(speeds.items()):
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, **_style(i, label))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result.config.model}: decode speed vs context length")
    ax.grid(True, alpha=0.3)
    if speeds:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / SPEED_PNG)
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _pareto(result: BenchResult, rows: list[dict[str, object]], path: Path) -> Path:
    """Accuracy and KL against bits per element: one point per method and budget (peers hollow),
    labelled, and each panel's Pareto frontier as a step line."""
    import matplotlib.pyplot as plt

    dtype_bits = _dtype_bits(result)
    panels = [
        (m, hi) for m, hi in (("accuracy", True), ("kl", False)) if any(r.get(m) is not None for r in rows)
    ]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(7 * max(1, len(panels)), 5), squeeze=False)
    for ax, (metric, higher) in zip(axes[0], panels):
        points = []
        for i, row in enumerate(rows):
            bits, value = bits_per_element(row, dtype_bits), row.get(metric)
            if bits is None or not isinstance(value, float) or math.isnan(value):
                continue
            method = str(row["method"])
            label = method if row["budget"] is None else f"{method} {row['budget']:.0%}"
            style = _style(i, method)
            hollow = style["linestyle"] == "--"
            ax.scatter(
                [bits],
                [value],
                marker=style["marker"],
                s=40,
                label=label,
                facecolors="none" if hollow else style["color"],
                edgecolors=style["color"],
            )
            points.append((bits, value))
        edge = frontier(points, higher)
        if edge:
            xs, ys = zip(*edge)
            ax.step(xs, ys, where="post", color="black", alpha=0.4, linewidth=1, label="frontier")
        ax.axvline(dtype_bits / 10, color="grey", linestyle=":", linewidth=1, label="10% of the full cache")
        if not higher:  # KL spans orders of magnitude; the full cache's 0 stays on the axis
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV bits per element, metadata and residual blocks included (log scale)")
        ax.set_ylabel("exact match" if metric == "accuracy" else "KL vs the full cache (nats)")
        ax.set_title(f"{result.config.model}, {result.config.length} tokens: {metric} vs bits per element")
        ax.grid(True, alpha=0.3)
        if points:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(result: BenchResult, out: Path) -> list[Path]:
    """Write the results folder; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["summary"] = summarize(result)
    json_path = out / RESULTS_JSON
    json_path.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
    md_path = out / RESULTS_MD
    md_path.write_text(markdown(result))
    return [json_path, md_path, *plot(result, out)]


def summary_line(result: BenchResult) -> str:
    """One line for stdout: the best accuracy at the smallest budget, and the full cache's."""
    rows = [r for r in summarize(result) if "error" not in r]
    full = next((r for r in rows if r["method"] == "full"), None)
    smallest = min(result.config.budgets)
    at_small = [r for r in rows if r["budget"] == smallest and r.get("accuracy") is not None]
    parts = [f"{len(result.records)} answers"]
    if full is not None and full.get("accuracy") is not None:
        parts.append(f"full cache accuracy {_fmt(full['accuracy'])}")
    if at_small:
        best = max(at_small, key=lambda r: float(r["accuracy"]))  # type: ignore[arg-type]
        parts.append(
            f"best at {smallest:.0%}: {best['method']} accuracy {_fmt(best['accuracy'])} "
            f"holding {_fmt(best['kv_ratio'])} of the full cache"
        )
    return "; ".join(parts)
