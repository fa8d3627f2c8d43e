"""A damaged fleet: every broken file is named in a one-line error, and a worker keeps serving its other models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from broker.codec import decode
from broker.messages import WorkerEvent
from tests.calmproc import calm_up, collect, send
from workers.engine import OnnxCausalLM
from workers.errors import EngineLoadError
from workers.fleet.spec import FleetError, load_fleet

Damage = Callable[[Path, Path], Path]  # (model dir, fleet dir) -> the file the error must name


def _garbage_onnx(model: Path, _fleet: Path) -> Path:
    (model / "model.onnx").write_bytes(os.urandom(4096))
    return model / "model.onnx"


def _truncated_onnx(model: Path, _fleet: Path) -> Path:
    data = (model / "model.onnx").read_bytes()
    (model / "model.onnx").write_bytes(data[: len(data) // 2])
    return model / "model.onnx"


def _no_onnx(model: Path, _fleet: Path) -> Path:
    (model / "model.onnx").unlink()
    return model / "model.onnx"


def _no_tokenizer(model: Path, _fleet: Path) -> Path:
    (model / "tokenizer.json").unlink()
    return model / "tokenizer.json"


def _garbage_tokenizer(model: Path, _fleet: Path) -> Path:
    (model / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    return model / "tokenizer.json"


def _foreign_tokenizer(model: Path, fleet: Path) -> Path:
    shutil.copy(fleet / "embedder" / "tokenizer.json", model / "tokenizer.json")  # BERT's 30522 tokens
    return model / "tokenizer.json"


DAMAGES: dict[str, Damage] = {"garbage_onnx": _garbage_onnx, "truncated_onnx": _truncated_onnx,
                              "missing_onnx": _no_onnx, "missing_tokenizer": _no_tokenizer,
                              "garbage_tokenizer": _garbage_tokenizer, "foreign_tokenizer": _foreign_tokenizer}


def fleet_copy(tiny_fleet: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_fleet, tmp_path / "fleet"))


@pytest.mark.parametrize("eos_token", [None, "<|endoftext|>"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_model_dir_fails_to_load_with_one_line_naming_the_file(
        tiny_fleet: Path, tmp_path: Path, damage: str, eos_token: str | None) -> None:
    fleet = fleet_copy(tiny_fleet, tmp_path)
    model = fleet / "models" / "arith"
    culprit = DAMAGES[damage](model, fleet)
    with pytest.raises(EngineLoadError) as info:
        OnnxCausalLM.load(model, name="arith", eos_token=eos_token)
    message = str(info.value)
    assert "\n" not in message and str(culprit) in message, message
    OnnxCausalLM.load(fleet / "models" / "sort", name="sort", eos_token=eos_token).close()  # the others load


def _calm(args: list[str], url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CALM_REDIS_URL": url, "CALM_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "calm", *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_missing_model_file_is_left_to_that_models_load_in_a_worker(tiny_fleet: Path, tmp_path: Path) -> None:
    fleet = fleet_copy(tiny_fleet, tmp_path)
    culprit = _no_onnx(fleet / "models" / "sort", fleet)
    with pytest.raises(FleetError, match=str(culprit)):
        load_fleet(fleet)  # tools that need every model (bench, export) refuse the fleet
    lenient = load_fleet(fleet, require_model_files=False)  # a worker keeps the other models
    assert lenient.names == ("arith", "sort", "generalist")
    with pytest.raises(EngineLoadError, match=str(culprit)):
        OnnxCausalLM.load(lenient.model_dir(lenient.model("sort")), name="sort")


@pytest.mark.parametrize("damage", ["not_toml", "unknown_field", "no_fleet_toml"])
def test_a_bad_fleet_stops_the_worker_at_start_with_one_line_naming_the_file(
        tiny_fleet: Path, tmp_path: Path, redis_url: str, prefix: str, damage: str) -> None:
    fleet = fleet_copy(tiny_fleet, tmp_path)
    toml = fleet / "fleet.toml"
    culprit = toml
    if damage == "not_toml":
        toml.write_text(toml.read_text(encoding="utf-8").replace("[[models]]", "[[models]", 1), encoding="utf-8")
    elif damage == "unknown_field":
        toml.write_text(toml.read_text(encoding="utf-8").replace('name = "sort"', 'name = "sort"\nsize = 3', 1),
                        encoding="utf-8")
    else:
        toml.unlink()
    out = _calm(["worker", "--fleet", str(fleet)], redis_url, prefix)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calm: ") and str(culprit) in lines[0], out.stderr


@pytest.mark.slow
def test_a_worker_with_one_corrupt_model_serves_the_others(tiny_fleet: Path, tmp_path: Path, redis_url: str,
                                                           prefix: str) -> None:
    fleet = fleet_copy(tiny_fleet, tmp_path)
    culprit = _garbage_onnx(fleet / "models" / "arith", fleet)
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, fleet, "--set=executor.attempt_timeout_s=5",
                 "--set=streams.reclaim_idle_ms=1500") as calm:
        workers = {a["pid"] for a in calm.status()["actors"].values() if a["role"] == "worker"}
        ids = {f"sort-{i}": send(client, prefix, prompt=f"sort {i % 10} {(i * 7) % 10} 3 =", id=f"sort-{i}",
                                 model="sort", max_new_tokens="8") for i in range(8)}
        ids |= {f"gen-{i}": send(client, prefix, prompt=f"{i}+{i}=", id=f"gen-{i}", model="generalist",
                                 max_new_tokens="4") for i in range(4)}
        ids |= {f"arith-{i}": send(client, prefix, prompt=f"{i}+1=", id=f"arith-{i}", model="arith",
                                   max_new_tokens="4") for i in range(4)}
        got = collect(client, f"{prefix}replies", set(ids), timeout_s=180)
        time.sleep(1.0)
        after = {a["pid"] for a in calm.status()["actors"].values() if a["role"] == "worker"}
        events = [decode(f, e.decode(), f"{prefix}sched") for e, f in client.xrange(f"{prefix}sched")]
    failures = [e for e in events if isinstance(e, WorkerEvent) and e.event == "load_failed"]
    assert set(got) == set(ids) and all(len(v) == 1 for v in got.values()), "one reply per query"
    assert all(got[k][0]["status"] == "ok" for k in ids if not k.startswith("arith-")), "other models serve"
    pinned = [got[k][0] for k in ids if k.startswith("arith-")]
    assert all(r["status"] != "ok" and r["error"] for r in pinned), pinned
    assert failures and all(f.model == "arith" and str(culprit) in f.detail and "\n" not in f.detail
                            for f in failures), failures
    assert len(failures) <= 20, f"the scheduler backs off a model that fails to load ({len(failures)} tries)"
    assert workers and workers == after, "the worker stayed up"
    print(f"corrupt arith: {len(failures)} load_failed events; pinned replies: {[r['error'] for r in pinned][:2]}")
