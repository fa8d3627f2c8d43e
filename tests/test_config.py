"""Settings: defaults, then TOML, then CALM_* variables, then flags; coercion and invariants."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import (
    DEFAULT_REDIS_URL,
    RedisSettings,
    Settings,
    StreamSettings,
    load_settings,
)
from broker.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "calm.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_env_or_flags() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.redis.url is None
    assert s.redis.prefix == "calm:"
    assert s.redis.embedded is True
    assert s.streams.block_ms == 1000
    assert s.ingress.max_prompt_bytes == 32 * 1024
    assert s.ingress.default_max_new_tokens == 64
    assert s.ingress.max_new_tokens_limit == 1024
    assert s.ingress.dedup_window_s == 3600
    assert s.planner.strategy == "utility"
    assert s.worker.models == ()
    assert s.paths.fleet is None
    assert DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[redis]
url = "redis://example:6380/1"
prefix = "t:"
embedded = false
[streams]
block_ms = 250
[planner]
w_fit = 2
[worker]
models = ["a", "b"]
""",
    )
    s = load_settings(config_file=path, env={})
    assert s.redis.url == "redis://example:6380/1"
    assert s.redis.prefix == "t:"
    assert s.redis.embedded is False
    assert s.streams.block_ms == 250
    assert s.planner.w_fit == 2.0 and isinstance(s.planner.w_fit, float)
    assert s.worker.models == ("a", "b")
    # untouched fields keep their defaults
    assert s.streams.batch == StreamSettings().batch
    assert s.redis.connect_timeout_s == RedisSettings().connect_timeout_s


def test_calm_config_variable_names_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[streams]\nbatch = 7\n")
    s = load_settings(env={"CALM_CONFIG": str(path)})
    assert s.streams.batch == 7


def test_explicit_file_wins_over_calm_config(tmp_path: Path) -> None:
    a = _toml(tmp_path, "[streams]\nbatch = 7\n")
    b = tmp_path / "other.toml"
    b.write_text("[streams]\nbatch = 9\n", encoding="utf-8")
    s = load_settings(config_file=b, env={"CALM_CONFIG": str(a)})
    assert s.streams.batch == 9


def test_generic_env_overrides_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[streams]\nblock_ms = 250\nbatch = 7\n[qos]\newma_alpha = 0.5\n")
    s = load_settings(config_file=path, env={"CALM_STREAMS_BLOCK_MS": "300", "CALM_QOS_EWMA_ALPHA": "0.1"})
    assert s.streams.block_ms == 300
    assert s.qos.ewma_alpha == pytest.approx(0.1)
    assert s.streams.batch == 7  # from the file, no env for it


def test_contract_aliases_override_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[redis]\nurl = "redis://file:1/0"\nprefix = "file:"\n[paths]\nfleet = "/file/fleet"\n')
    env = {"CALM_REDIS_URL": "redis://env:2/0", "CALM_PREFIX": "env:", "CALM_FLEET": "/env/fleet"}
    s = load_settings(config_file=path, env=env)
    assert s.redis.url == "redis://env:2/0"
    assert s.redis.prefix == "env:"
    assert s.paths.fleet == "/env/fleet"


def test_alias_wins_over_generic_name_for_the_same_field() -> None:
    s = load_settings(env={"CALM_REDIS_PREFIX": "generic:", "CALM_PREFIX": "alias:"})
    assert s.redis.prefix == "alias:"


def test_empty_alias_is_ignored() -> None:
    s = load_settings(env={"CALM_PREFIX": "", "CALM_FLEET": ""})
    assert s.redis.prefix == "calm:"
    assert s.paths.fleet is None


def test_unrelated_environment_is_ignored() -> None:
    s = load_settings(env={"HOME": "/nowhere", "CALMNESS": "1", "REDIS_URL": "redis://x:1/0"})
    assert s == Settings()


def test_flags_override_env(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[streams]\nblock_ms = 250\n")
    s = load_settings(
        config_file=path,
        env={"CALM_STREAMS_BLOCK_MS": "300", "CALM_PREFIX": "env:"},
        overrides={"streams.block_ms": 400, "redis.prefix": "flag:"},
    )
    assert s.streams.block_ms == 400
    assert s.redis.prefix == "flag:"


def test_flags_set_to_none_leave_lower_layers_alone() -> None:
    s = load_settings(env={"CALM_PREFIX": "env:"}, overrides={"redis.prefix": None, "streams.batch": 3})
    assert s.redis.prefix == "env:"
    assert s.streams.batch == 3


@pytest.mark.parametrize(
    ("var", "raw", "section", "name", "expected"),
    [
        ("CALM_REDIS_EMBEDDED", "false", "redis", "embedded", False),
        ("CALM_REDIS_EMBEDDED", "0", "redis", "embedded", False),
        ("CALM_REDIS_EMBEDDED", "off", "redis", "embedded", False),
        ("CALM_LOG_JSON", "yes", "log", "json", True),
        ("CALM_LOG_JSON", "ON", "log", "json", True),
        ("CALM_LOG_JSON", "1", "log", "json", True),
        ("CALM_STREAMS_BATCH", " 12 ", "streams", "batch", 12),
        ("CALM_WORKER_MEMORY_MB", "4096", "worker", "memory_mb", 4096),
        ("CALM_PLANNER_W_LATENCY", "0.75", "planner", "w_latency", 0.75),
        ("CALM_EXECUTOR_ATTEMPT_TIMEOUT_S", "5", "executor", "attempt_timeout_s", 5.0),
        ("CALM_WORKER_MODELS", "a, b,,c ", "worker", "models", ("a", "b", "c")),
        ("CALM_WORKER_PRELOAD", "", "worker", "preload", ()),
        ("CALM_WORKER_WORKER_ID", "w-7", "worker", "worker_id", "w-7"),
        ("CALM_WORKER_WORKER_ID", "none", "worker", "worker_id", None),
        ("CALM_REDIS_URL", "", "redis", "url", None),
    ],
)
def test_env_values_are_coerced_to_the_field_type(var: str, raw: str, section: str, name: str, expected) -> None:
    value = getattr(getattr(load_settings(env={var: raw}), section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_toml_native_types_are_accepted(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[log]\njson = true\n[worker]\npreload = []\nheartbeat_s = 2\n[paths]\nfleet = \"/f\"\n")
    s = load_settings(config_file=path, env={})
    assert s.log.json is True
    assert s.worker.preload == ()
    assert s.worker.heartbeat_s == 2.0 and isinstance(s.worker.heartbeat_s, float)
    assert s.paths.fleet == "/f"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CALM_STREAMS_BLOCK_MS": "abc"}, "streams.block_ms"),
        ({"CALM_STREAMS_BLOCK_MS": "1.5"}, "streams.block_ms"),
        ({"CALM_REDIS_EMBEDDED": "maybe"}, "redis.embedded"),
        ({"CALM_PLANNER_W_FIT": "heavy"}, "planner.w_fit"),
        ({"CALM_QOS_WINDOW": "none"}, "qos.window"),
        ({"CALM_PLANNER_QUALITY_TOLERANCE": "1.5"}, "planner.quality_tolerance"),
        ({"CALM_PLANNER_PROFILE_RANK": "-1"}, "planner.profile_rank"),
    ],
)
def test_bad_env_values_raise_config_error_naming_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_settings(env=env)
    assert "environment" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[streams]\nblock_ms = true\n", "streams.block_ms"),
        ("[streams]\nblock_ms = 1.5\n", "streams.block_ms"),
        ("[redis]\nembedded = \"sometimes\"\n", "redis.embedded"),
        ("[planner]\nw_fit = \"x\"\n", "planner.w_fit"),
    ],
)
def test_bad_toml_values_raise_config_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_settings(config_file=path, env={})
    assert str(path) in str(info.value)


def test_unknown_section_in_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[nosuch]\nx = 1\n")
    with pytest.raises(ConfigError, match="nosuch"):
        load_settings(config_file=path, env={})


def test_unknown_field_in_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[redis]\nport = 6379\n")
    with pytest.raises(ConfigError, match=r"redis\.port"):
        load_settings(config_file=path, env={})


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "redis = 5\n")
    with pytest.raises(ConfigError, match="redis"):
        load_settings(config_file=path, env={})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config_file=tmp_path / "absent.toml", env={})
    bad = _toml(tmp_path, "[redis\nurl = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=bad, env={})


def test_unknown_flag_keys_raise() -> None:
    with pytest.raises(ConfigError, match=r"streams\.nope"):
        load_settings(env={}, overrides={"streams.nope": 1})
    with pytest.raises(ConfigError, match="nosuch"):
        load_settings(env={}, overrides={"nosuch.x": 1})
    with pytest.raises(ConfigError, match=r"section\.field"):
        load_settings(env={}, overrides={"prefix": "x:"})


def test_invariants_are_checked_when_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.prefix"):
        RedisSettings(prefix="")
    with pytest.raises(ConfigError, match=r"redis\.prefix"):
        RedisSettings(prefix="has space:")
    with pytest.raises(ConfigError, match=r"redis\.prefix"):
        load_settings(env={"CALM_REDIS_PREFIX": ""})
    with pytest.raises(ConfigError, match=r"streams\.block_ms"):
        load_settings(env={"CALM_STREAMS_BLOCK_MS": "0"})
    with pytest.raises(ConfigError, match=r"streams\.max_deliveries"):
        load_settings(config_file=_toml(tmp_path, "[streams]\nmax_deliveries = -1\n"), env={})


def test_replace_applies_dotted_overrides_and_keeps_the_rest() -> None:
    base = Settings()
    s = base.replace({"redis.prefix": "x:", "streams.batch": "5"})
    assert s.redis.prefix == "x:"
    assert s.streams.batch == 5
    assert base.redis.prefix == "calm:"  # frozen original unchanged
    assert s.to_dict()["streams"]["batch"] == 5
    assert s.to_dict()["planner"] == base.to_dict()["planner"]
