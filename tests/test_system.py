"""End to end: ``calm up`` as real processes on the tiny fleet, queried with a raw Redis client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow

REPLY_FIELDS = ("id", "status", "text", "model", "worker", "cached", "latency_ms", "route_ms", "queue_ms",
                "inference_ms", "tokens_in", "tokens_out", "energy_j", "energy_source", "confidence", "error")
FAST = ("--set=streams.reclaim_idle_ms=1500", "--set=streams.reclaim_interval_ms=300",
        "--set=executor.attempt_timeout_s=30", "--set=scheduler.worker_timeout_s=4")


def _eval_prompts(fleet: Path, domain: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (fleet / "eval" / f"{domain}.jsonl").read_text().splitlines() if line]
    return rows[:n]


def _specialist(fleet: Path, domain: str) -> str:
    from workers.fleet.spec import load_fleet

    cards = [m for m in load_fleet(fleet).models if domain in m.domains and not m.baseline]
    assert len(cards) == 1
    return cards[0].name


def test_queries_get_one_complete_reply_from_their_specialist(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "2", *FAST) as calm:
        sent: dict[str, str] = {}
        for domain in ("arithmetic", "sorting"):
            for i, row in enumerate(_eval_prompts(tiny_fleet, domain, 12)):
                qid = f"{domain}-{i}"
                send(client, prefix, prompt=row["prompt"], id=qid, max_new_tokens="16")
                sent[qid] = domain
        got = collect(client, f"{prefix}replies", set(sent))
        status = calm.status()
        classifier = client.hgetall(f"{prefix}classifier")
        decisions = client.xrange(f"{prefix}decisions")
    assert set(got) == set(sent), "every query gets a reply"
    # the monitor trained the domain classifier over the specialists (the baseline is no class)
    assert json.loads(classifier[b"models"]) == sorted(_specialist(tiny_fleet, d) for d in ("arithmetic", "sorting"))
    assert classifier[b"digest"] and len(classifier[b"blob"]) > 0
    # each decision explains every candidate: its fit share and the raw cosine it came from
    assert decisions
    for _, fields in decisions:
        for c in json.loads(fields[b"candidates"]):
            assert 0.0 <= c["fit"] <= 1.0 and -1.0 <= c["cosine"] <= 1.0, c
    assert all(len(v) == 1 for v in got.values()), "exactly one reply per query"
    for qid, domain in sent.items():
        reply = got[qid][0]
        for name in REPLY_FIELDS:
            assert name in reply, f"reply lacks {name}"
        assert reply["status"] == "ok", reply
        assert reply["model"] == _specialist(tiny_fleet, domain), (qid, reply["model"], reply.get("attempts"),
                                                                    reply.get("reason"))
        assert reply["cached"] == "0"
        assert reply["energy_source"] in ("nvml", "rapl", "estimate")
        assert float(reply["latency_ms"]) >= float(reply["inference_ms"]) > 0
        assert 0 < float(reply["confidence"]) <= 1
        assert int(reply["tokens_out"]) >= 1
    assert {w["pid"] for w in status["workers"].values()} and len(status["workers"]) == 2
    assert {a["role"] for a in status["actors"].values()} >= {"monitor", "analyzer", "planner", "executor",
                                                             "scheduler"}


def test_pins_bad_input_and_a_killed_worker(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    replies = f"{prefix}replies"
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "2", *FAST) as calm:
        # A pinned model is honoured even when another model fits the prompt better.
        send(client, prefix, prompt="12+7=", id="pinned", model="generalist")
        # Bad input: each gets a rejected reply with a reason and a dead letter.
        bad = {
            "unknown-model": {"prompt": "1+1=", "model": "no-such-model"},
            "empty-prompt": {"prompt": "   "},
            "huge-prompt": {"prompt": "x" * (33 * 1024)},
            "bad-tokens": {"prompt": "1+1=", "max_new_tokens": "0"},
        }
        for qid, fields in bad.items():
            send(client, prefix, id=qid, **fields)
        client.xadd(f"{prefix}queries", {"prompt": "1+1=", "id": "forbidden", "reply_to": "elsewhere"})
        got = collect(client, replies, {"pinned", *bad})
        assert got["pinned"][0]["status"] == "ok" and got["pinned"][0]["model"] == "generalist"
        for qid in bad:
            reply = got[qid][0]
            assert reply["status"] == "rejected" and reply["error"], reply
        assert "unknown model" in got["unknown-model"][0]["error"]
        assert "empty" in got["empty-prompt"][0]["error"]
        assert "over the limit" in got["huge-prompt"][0]["error"]
        assert "max_new_tokens" in got["bad-tokens"][0]["error"]
        dead = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(f"{prefix}dead")]
        assert len(dead) == len(bad) + 1
        assert any("reply_to" in d["reason"] for d in dead), "the forbidden reply_to is dead-lettered"
        assert all(d["actor"] == "monitor" and d["stream"] == f"{prefix}queries" for d in dead)

        # A worker is SIGKILLed while queries flow: every query still gets exactly one reply.
        status = calm.status()
        victim = next(w for w in status["workers"].values() if w["models_loaded"])
        ids = set()
        for i in range(30):
            qid = f"flow-{i}"
            send(client, prefix, prompt=f"{i}+{i}=", id=qid, max_new_tokens="8")
            ids.add(qid)
            if i == 5:
                os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(0.02)
        got = collect(client, replies, ids, timeout_s=180)
        assert ids <= set(got), f"missing replies: {sorted(ids - set(got))}"
        assert all(len(v) == 1 for k, v in got.items() if k in ids)
        assert all(got[i][0]["status"] == "ok" for i in ids), [got[i][0] for i in ids if got[i][0]["status"] != "ok"]
        # The supervisor restarted the killed worker.
        after = calm.status()
        assert len([w for w in after["workers"].values() if w["alive"]]) == 2
        assert victim["pid"] not in {w["pid"] for w in after["workers"].values()}


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_children_stop_when_calm_up_is_killed(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    """A supervisor killed outright (SIGKILL: no chance to stop anyone) leaves no actor or worker serving."""
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", *FAST) as calm:
        status = calm.status()
        children = {a["pid"] for a in status["actors"].values()} | {w["pid"] for w in status["workers"].values()}
        assert len(children) == 6 and all(_running(pid) for pid in children)  # five actors and the worker
        calm.proc.kill()
        calm.proc.wait(timeout=30)
        deadline = time.monotonic() + 60  # a guard, not a measurement: they stop within about a second
        while time.monotonic() < deadline and any(_running(pid) for pid in children):
            time.sleep(0.1)
        outlived = [pid for pid in children if _running(pid)]
        for pid in outlived:  # (they hold calm up's output pipe open: leaving them would hang the test)
            os.kill(pid, signal.SIGKILL)
    assert outlived == [], "children outlived their supervisor"


def test_sigterm_ends_a_command_as_ctrl_c_does(redis_url: str, prefix: str) -> None:
    """``calm query`` waiting for a reply that will not come: SIGTERM ends it as Ctrl-C does (exit 130, no
    traceback), the handling that lets ``calm bench`` stop the system it started."""
    proc = subprocess.Popen([sys.executable, "-m", "calm", "query", "2+2=", "--timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CALM_REDIS_URL": redis_url, "CALM_PREFIX": prefix})
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not client.xlen(f"{prefix}queries"):
        time.sleep(0.05)
    assert client.xlen(f"{prefix}queries") == 1, "the command never sent its query"  # it now waits for a reply
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a command that did not end must not outlive the test
    assert proc.returncode == 130, err
    assert "Traceback" not in err
