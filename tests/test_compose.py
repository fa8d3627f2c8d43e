"""``compose.yaml`` against the Compose Specification's JSON schema, and the topology it describes.

The schema is vendored in ``tests/data/compose-spec.json`` (see ``tests/data/README.md``), so this
runs offline; Docker itself is not needed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml

import calm.cli
from broker.config import Settings
from broker.kb import KnowledgeBase, WorkerState
from broker.names import Names
from calm.gateway.probe import actor_alive, worker_alive

ROOT = Path(__file__).resolve().parent.parent
ACTORS = ("monitor", "analyzer", "planner", "executor", "scheduler")
RUNTIME = (*ACTORS, "gateway", "worker", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_is_valid_against_the_compose_specification(compose: dict, validator: Any) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_mistakes(compose: dict, validator: Any) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"]["replicas"] = [2]
    broken["services"]["gateway"]["healthcheck"]["intervall"] = "5s"
    paths = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    assert any(p.startswith("services/worker/deploy") for p in paths)
    assert any(p.startswith("services/gateway/healthcheck") for p in paths)


def test_topology_one_service_per_actor_a_scalable_worker_and_a_gpu_profile(compose: dict) -> None:
    services = compose["services"]
    assert set(services) >= {"redis", "fleet", *RUNTIME}
    assert "valkey" in services["redis"]["image"] or "redis" in services["redis"]["image"]
    for role in ACTORS:
        assert services[role]["command"] == ["actor", role]
    for name in ("redis", *RUNTIME):
        assert "test" in services[name]["healthcheck"], f"{name} has no healthcheck"
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "a worker must scale with --scale worker=N"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "--device" in gpu["command"] and "cuda" in gpu["command"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "profiles" not in worker and "profiles" not in services["gateway"]
    assert set(compose["volumes"]) >= {"fleet", "redis-data"}
    for name in RUNTIME:
        assert "fleet:/var/lib/calm/fleet:ro" in services[name]["volumes"]
        assert services[name]["depends_on"]["fleet"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["CALM_REDIS_URL"] == "redis://redis:6379/0"
    assert "fleet:/var/lib/calm/fleet" in services["fleet"]["volumes"]


def test_every_command_is_a_valid_calm_command_and_every_target_exists(compose: dict,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if "calm.gateway.cli" not in calm.cli.COMMAND_MODULES:
        monkeypatch.setattr(calm.cli, "COMMAND_MODULES", (*calm.cli.COMMAND_MODULES, "calm.gateway.cli"))
    parser = calm.cli.build_parser()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["target"] in targets, name
        if name == "redis":
            continue
        command = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", part) for part in service["command"]]
        parser.parse_args(command)  # raises on a usage error
        probe = service.get("healthcheck", {}).get("test", [])
        if "calm.gateway.probe" in probe:
            assert probe[:4] == ["CMD", "python", "-m", "calm.gateway.probe"], shlex.join(probe)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


async def test_probes_see_this_hosts_heartbeats(redis_url: str, settings: Settings, aclient: Any) -> None:
    names = Names(settings.redis.prefix)
    kb = KnowledgeBase(aclient, names)
    client = redis.Redis.from_url(redis_url)
    assert not actor_alive(client, names, "planner", "box1") and not worker_alive(client, names, "box1")
    pipe = aclient.pipeline(transaction=True)
    kb.actor_heartbeat(pipe, "planner", "box1-7", 7, ttl_s=30)
    kb.register_worker(pipe, WorkerState(id="box2-9"), ttl_s=30)
    await pipe.execute()
    assert actor_alive(client, names, "planner", "box1") and not actor_alive(client, names, "monitor", "box1")
    assert not actor_alive(client, names, "planner", "box2")
    assert worker_alive(client, names, "box2") and not worker_alive(client, names, "box1")
    await aclient.delete(names.worker_alive("box2-9"))  # heartbeats stopped: the TTL'd key is gone
    assert not worker_alive(client, names, "box2")
    client.close()
