"""A bench run's results folder: ``results.json`` (everything), ``results.md`` (one row per method
and budget) and two plots: ``accuracy_vs_bytes.png`` and ``decode_speed.png``."""

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
ACCURACY_PNG, SPEED_PNG = "accuracy_vs_bytes.png", "decode_speed.png"


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
    dtype_bits = float(str(env.get("dtype_bits", 32)))  # results written before it was recorded: float32
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
        ratio = row["kv_ratio"]
        bits = ratio * dtype_bits if isinstance(ratio, float) else None
        cells += [_fmt(ratio), _fmt(bits), _fmt(row["ttft_s"]), _fmt(row["decode_tokens_per_s"], 1)]
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
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


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
