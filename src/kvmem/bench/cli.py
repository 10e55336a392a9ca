"""``kvmem bench``: its arguments and the command. ``kvmem.cli`` registers it."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmem.bench.config import MODES, BenchConfig, is_kvpress, split_method, suite
from kvmem.bench.registry import TASKS
from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import make_policy
from kvmem.engine import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="accuracy vs physical KV bytes, TTFT and decode speed for policies and peers, with plots",
        description="Run seeded long-context tasks (passkey, key-value retrieval, variable tracking, "
        "real-text perplexity/KL) under each method and budget, beside the full cache and "
        "transformers' own generate; write results.json, results.md and PNG plots to --out.",
    )
    bench.add_argument(
        "--suite",
        choices=("quick", "full"),
        default="quick",
        help="quick (default, a few minutes on 2 cores) or full (14 methods incl. peers: about 20 min for "
        "SmolLM2 on 2 cores, about 32 min for Gemma 3 at 3k tokens)",
    )
    options.add_options(bench, ("model",))  # EngineConfig's, as every command spells it
    bench.add_argument(
        "--methods",
        help="comma-separated: full, hf (transformers' generate), hf-quanto4 / hf-quanto2 (its "
        "QuantizedCache), policy names (snapkv+kivi4, ...; with @prompt, e.g. snapkv@prompt, the policy "
        "compresses once after each prompt, run at full size first), kvpress:<press>",
    )
    bench.add_argument(
        "--budgets", help="comma-separated shares of the full cache's bytes, e.g. 0.5,0.25,0.1"
    )
    bench.add_argument("--tasks", help=f"comma-separated, from: {', '.join(TASKS)}")
    bench.add_argument("--length", type=int, help="prompt tokens (default: the suite's, per model)")
    bench.add_argument("--contexts", type=int, help="seeded contexts per task")
    bench.add_argument("--mode", choices=MODES, help="single, multiturn (default) or multirequest")
    bench.add_argument(
        "--speed-lengths", help="context lengths for the decode-speed plot, e.g. 512,1024 (0: skip it)"
    )
    bench.add_argument("--seed", type=int, help="seed of the first context (default 0)")
    options.add_options(bench, ("block_size",))  # for kvmem's methods
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument(
        "--replot",
        type=Path,
        metavar="DIR",
        help="run nothing: redraw DIR's results.md and plots from its results.json",
    )


def config_from(args: argparse.Namespace) -> BenchConfig:
    config = suite(args.suite, args.model)
    changes: dict[str, object] = {}
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        for method in methods:
            if (
                method != "full" and not method.startswith("hf") and not is_kvpress(method)
            ):  # BenchConfig checks
                make_policy(split_method(method)[0], KVBudget.parse("1GiB"))  # raises for an unknown policy
        changes["methods"] = methods
    if args.budgets:
        try:
            changes["budgets"] = tuple(
                float(b.strip().rstrip("%")) / (100 if "%" in b else 1) for b in args.budgets.split(",")
            )
        except ValueError:
            raise ValueError(f"--budgets: shares such as 0.5,0.25 or 50%,25%, got {args.budgets!r}") from None
    if args.tasks:
        changes["tasks"] = tuple(t.strip() for t in args.tasks.split(","))
    if args.speed_lengths:
        try:
            lengths = tuple(int(n) for n in args.speed_lengths.split(",") if int(n) > 0)
        except ValueError:
            why = f"--speed-lengths: token counts like 512,1024, got {args.speed_lengths!r}"
            raise ValueError(why) from None
        changes["speed_lengths"] = lengths
    for name in ("length", "contexts", "mode", "seed"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    changes |= options.values(args, ("block_size",))  # the same default as BenchConfig's
    return config.replace(**changes)


def cmd_bench(args: argparse.Namespace) -> int:
    from kvmem.bench.report import summary_line, write
    from kvmem.bench.run import run_bench

    if args.replot is not None:
        import json

        from kvmem.bench.report import RESULTS_JSON
        from kvmem.bench.run import BenchResult

        source = args.replot / RESULTS_JSON
        if not source.is_file():
            raise FileNotFoundError(f"--replot: no {RESULTS_JSON} in {args.replot}")
        result = BenchResult.from_dict(json.loads(source.read_text()))
        paths = write(result, args.replot)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    config = config_from(args)
    result = run_bench(config, progress=not args.no_progress)
    paths = write(result, args.out)
    print(summary_line(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
