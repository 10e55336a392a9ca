"""``kvmem.engine.options``: EngineConfig's fields as command-line flags, read back by name."""

import argparse

import pytest

from kvmem.engine.config import FIELDS, EngineConfig, field_help
from kvmem.engine.options import FLAGS, add_options, flag_help, values
from kvmem.tiers.cli import default_dir


def parser(defaults: dict[str, object] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_options(p, FIELDS, defaults)
    return p


def test_every_field_has_a_flag_and_no_flag_lacks_a_field() -> None:
    assert set(FLAGS) == set(FIELDS)
    assert len({flag.flag for flag in FLAGS.values()}) == len(FLAGS)


def test_unset_flags_give_the_dataclass_defaults() -> None:
    assert EngineConfig(**values(parser().parse_args([]))) == EngineConfig()


def test_flags_set_fields_by_name() -> None:
    args = parser().parse_args(
        ["--kv-budget", "64MiB", "--block-size", "16", "--reuse-whole-blocks", "--disk-cache"]
        + ["--redis-ttl", "60", "--reserve-new-tokens", "-1", "--max-num-seqs", "4"]
    )
    got = values(args)
    assert got["kv_budget"] == "64MiB" and got["block_size"] == 16 and got["max_num_seqs"] == 4
    assert got["exact_reuse"] is False  # --reuse-whole-blocks: the flag whose name is not the field's
    assert got["disk_cache"] == str(default_dir())  # given bare
    assert got["redis_ttl_s"] == 60.0 and got["reserve_new_tokens"] is None  # -1: none
    assert values(args, ("policy", "block_size")) == {"policy": None, "block_size": 16}


def test_a_command_may_change_a_default_and_its_help_says_so() -> None:
    args = parser({"reserve_new_tokens": 128}).parse_args([])
    assert values(args)["reserve_new_tokens"] == 128
    assert flag_help("reserve_new_tokens", 128).endswith("(-1: none; default 128)")


@pytest.mark.parametrize("name", FIELDS)
def test_a_flags_help_is_its_fields(name: str) -> None:
    refer = {other: FLAGS[other].flag for other in FIELDS}
    assert field_help(name, refer.__getitem__) in flag_help(name)
