"""What un-rotating costs a decode step of a rotated format: is rotating the queries worth it?

Usage: .venv/bin/python scripts/rotation_cost.py [--model smollm2-135m] [--policy rotk4v2+res8]

Rotated formats (``kvmem.compress.rotated``) un-rotate each block's keys and values on read
(``y @ M_h.T``), so attention and every layer kind see plain vectors. Rotating the queries instead
(and the attention output back once) would drop the keys' un-rotation from every step. This
profiles ``--steps`` decode steps after a ``--context``-token prompt with cProfile and prints the
share of the step spent in ``unrotate`` (keys and values), in decoding the packed blocks as a
whole, and the decode speed without the profiler for the full cache and the policy.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pydoc_data.topics import topics

import kvmem


def step_time(llm: kvmem.LLM, ids: list[int], steps: int, profile: cProfile.Profile | None = None) -> float:
    """Seconds per greedy decode step after prefilling ``ids`` (``profile``: enabled around the steps)."""
    seq = llm.new_sequence()
    seq.token_ids = list(ids)
    logits = seq.prefill(512)
    if profile is not None:
        profile.enable()
    start = time.perf_counter()
    for _ in range(steps):
        logits = seq.step(int(logits.argmax()))
    elapsed = time.perf_counter() - start
    if profile is not None:
        profile.disable()
    seq.release()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="rotk4v2+res8")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    model = kvmem.load_model(args.model, dtype="float32")
    llm = kvmem.LLM(model, policy=args.policy)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm.encode(text)[: args.context]
    full_s = step_time(kvmem.LLM(model), ids, args.steps)
    policy_s = step_time(llm, ids, args.steps)

    profile = cProfile.Profile()
    step_time(llm, ids, args.steps, profile)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(  # Sequence.step, cumulative
        ct
        for (path, _, name), (_, _, _, ct, _) in stats.items()
        if name == "step" and path.endswith("sequence.py")
    )

    def cumulative(function: str) -> float:
        return sum(ct for (_, _, name), (_, _, _, ct, _) in stats.items() if name == function)

    print(f"{args.model}, {len(ids)}-token context, {args.steps} decode steps, float32")
    print(f"decode: full cache {1 / full_s:.1f} tok/s, {args.policy} {1 / policy_s:.1f} tok/s")
    print(f"profiled step: {1000 * total / args.steps:.0f} ms")
    for function in ("decode_packed", "unrotate"):
        print(f"  {function}: {cumulative(function) / total:.0%} of the step")


if __name__ == "__main__":
    main()
