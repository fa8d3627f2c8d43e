"""``calm bench`` options given before a subcommand are kept (argparse's subparsers overwrite them otherwise)."""

from __future__ import annotations

import pytest

from calm.cli import build_parser


@pytest.mark.parametrize("sub", [["routing"], ["overhead"], ["live"], ["residency", "--synthetic", "phase",
                                                                   "--slots", "2"], ["soak"]])
def test_common_options_before_the_subcommand_are_kept(sub: list[str]) -> None:
    args = build_parser().parse_args(["bench", "--fleet", "/srv/fleet", "--prefix", "x:", "--set", "a.b=1", *sub])
    assert (args.fleet, args.prefix, args.set) == ("/srv/fleet", "x:", ["a.b=1"])


def test_options_after_the_subcommand_win_and_unset_ones_default() -> None:
    args = build_parser().parse_args(["bench", "--fleet", "/a", "routing", "--fleet", "/b"])
    assert args.fleet == "/b" and args.redis_url is None and args.set == [] and args.log_json is None


def test_live_options_before_live_are_kept() -> None:
    args = build_parser().parse_args(["bench", "--rate", "10", "--strategies", "single,calm", "live"])
    assert (args.rate, args.strategies, args.queries) == (10.0, "single,calm", "medium")
    args = build_parser().parse_args(["bench", "live", "--rate", "5"])
    assert (args.rate, args.workload) == (5.0, "shift")
