"""The connector's scheduler bookkeeping (``plan.Planner``), without vLLM: what is matched, loaded
and stored, step by step, on hand-made hashes and block ids."""

from __future__ import annotations

from kvmem.integrations.vllm.plan import BlockRef, Planner, ScheduledCached, ScheduledNew

BS = 4


def hashes(n: int, tag: str = "a") -> list[bytes]:
    return [f"{tag}{j}".encode() for j in range(n)]


def planner(present: set[bytes]) -> tuple[Planner, list[list[bytes]]]:
    asked: list[list[bytes]] = []

    def contains(keys: list[bytes]) -> list[bool]:
        asked.append(keys)
        return [k in present for k in keys]

    return Planner(BS, contains), asked


def test_match_is_the_leading_run_past_vllms_hits_and_never_the_last_token() -> None:
    h = hashes(5)
    p, asked = planner({h[0], h[1], h[2], h[4]})  # h[3] missing: the run stops there
    assert p.match("r", h, num_prompt_tokens=21, num_computed=4) == 2 * BS  # blocks 1, 2
    assert asked == [h[1:5]]  # from vLLM's own hits on, up to the prompt's last full block
    q, _ = planner(set(h))
    assert q.match("r", h[:4], num_prompt_tokens=16, num_computed=0) == 3 * BS  # token 15 is computed
    assert q.match("s", h, num_prompt_tokens=21, num_computed=20) == 0


def test_loads_are_the_matched_blocks_and_what_becomes_full_is_stored_once() -> None:
    h = hashes(5)
    p, _ = planner({h[0], h[1]})
    assert p.match("r", h, 21, 0) == 2 * BS
    ids = [10, 11, 12, 13, 14, 15]
    p.allocated("r", ids, 2 * BS)
    step = p.step([ScheduledNew("r", ids, num_computed_tokens=8, num_scheduled_tokens=13)], [])
    assert step.loads == {"r": [BlockRef(10, h[0], 0), BlockRef(11, h[1], 1)]}
    assert step.stores == [BlockRef(12, h[2], 2), BlockRef(13, h[3], 3), BlockRef(14, h[4], 4)]
    h.append(b"a5")  # a decoded token completes block 5 (vLLM appends to the same list)
    later = p.step([], [ScheduledCached("r", [16], False, num_computed_tokens=23, num_scheduled_tokens=1)])
    assert later.loads == {} and later.stores == [BlockRef(15, h[5], 5)]
    assert p.step([], [ScheduledCached("r", None, False, 24, 1)]).stores == []  # nothing new


def test_a_recomputation_after_a_failed_load_is_stored_again() -> None:
    h = hashes(4)
    p, _ = planner(set(h))
    assert p.match("r", h, 17, 0) == 4 * BS
    ids = [1, 2, 3, 4, 5]
    p.allocated("r", ids, 4 * BS)
    first = p.step([ScheduledNew("r", ids, 16, 1)], [])
    assert [r.depth for r in first.loads["r"]] == [0, 1, 2, 3] and first.stores == []
    # block 2 failed to load: vLLM recomputes from token 8
    again = p.step([], [ScheduledCached("r", None, False, num_computed_tokens=8, num_scheduled_tokens=9)])
    assert again.stores == [BlockRef(3, h[2], 2), BlockRef(4, h[3], 3)]


def test_a_resumed_request_takes_its_new_blocks_and_finished_ones_are_forgotten() -> None:
    h = hashes(3)
    p, _ = planner(set())
    assert p.match("r", h, 13, 0) == 0
    p.step([ScheduledNew("r", [1, 2, 3, 4], 0, 13)], [])
    back = ScheduledCached("r", [7, 8, 9, 6], True, num_computed_tokens=0, num_scheduled_tokens=13)
    resumed = p.step([], [back])
    assert resumed.stores == [BlockRef(7, h[0], 0), BlockRef(8, h[1], 1), BlockRef(9, h[2], 2)]
    p.finished("r")
    assert p.requests == {}
    assert p.step([], [ScheduledCached("r", None, False, 13, 1)]).stores == []
