"""How the fleet builder splits 2+ CPUs between build processes and threads."""

from __future__ import annotations

from workers.fleet.profiles import PROFILES
from workers.fleet.runner import plan_workers, training_cost


def test_equal_jobs_run_side_by_side_one_thread_each() -> None:
    assert plan_workers([1.0, 1.0, 1.0, 1.0], cpus=4) == (4, 1)


def test_a_dominant_job_gets_every_thread() -> None:
    assert plan_workers([10.0, 1.0, 1.0], cpus=2) == (1, 2)
    assert plan_workers([5.0], cpus=8) == (1, 8)


def test_more_cpus_than_jobs_go_to_threads() -> None:
    workers, threads = plan_workers([1.0, 1.0], cpus=8)
    assert (workers, threads) == (2, 4)


def test_demo_fleet_builds_serially_on_two_cpus_and_tiny_in_parallel() -> None:
    demo = [training_cost(m) for m in PROFILES["demo"].models]
    tiny = [training_cost(m) for m in PROFILES["tiny"].models]
    assert max(demo) > 2 * (sum(demo) - max(demo))  # the 4.0M baseline is most of the work
    assert plan_workers(demo, cpus=2) == (1, 2)
    assert plan_workers(tiny, cpus=2) == (2, 1)
