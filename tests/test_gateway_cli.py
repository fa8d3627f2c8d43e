"""``calm gateway`` as a process: it says where it listens, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

# Runs calm's CLI with the gateway's command module registered (a no-op once calm.cli lists it).
LAUNCH = ("import sys, calm.cli as c; m = 'calm.gateway.cli'; "
          "c.COMMAND_MODULES = c.COMMAND_MODULES if m in c.COMMAND_MODULES else (*c.COMMAND_MODULES, m); "
          "sys.exit(c.main(sys.argv[1:]))")


def test_gateway_command_serves_and_stops_on_sigterm(redis_url: str, prefix: str) -> None:
    env = {**os.environ, "CALM_REDIS_URL": redis_url, "CALM_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "gateway", "--port", "0", "--log-json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        with urllib.request.urlopen(f"{found.group(1)}/healthz", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{found.group(1)}/readyz", timeout=10)
        assert info.value.code == 503  # nothing registered under this prefix: not ready
        info.value.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert '"role": "gateway"' in err  # JSON-lines logs on stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_gateway_command_fails_with_one_line_when_no_broker_answers(prefix: str) -> None:
    env = {**os.environ, "CALM_REDIS_URL": "redis://127.0.0.1:1/0", "CALM_PREFIX": prefix}
    out = subprocess.run([sys.executable, "-c", LAUNCH, "gateway", "--port", "0"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("calm: no Redis server answers"), out.stderr
