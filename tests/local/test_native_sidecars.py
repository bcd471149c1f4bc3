"""Native sidecars in the local executor: init containers with ``restartPolicy: Always``
start in order before the main containers, stay up (restarted if they exit), are
stopped once the main containers finish, and their startup/readiness probes gate what
comes next."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jobrunner.local.client import LocalJobClient
from jobrunner.tracking.tracker import outcome_of
from tests.local.conftest import ManifestFactory
from tests.local.test_local_executor import finished, logs, render


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A sidecar HTTP server that starts listening after DELAY seconds and notes its pid.
SERVER = """
import http.server, os, sys, time
time.sleep(float(os.environ.get("DELAY", "0")))
open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"side")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

# The main container talks to the sidecar at once: it must already listen.
CLIENT = """
import os, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{os.environ['PORT']}/", timeout=2).read().decode())
"""


def sidecar(tmp_path: Path, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "side",
        "image": "python:3.12-slim",
        "restartPolicy": "Always",
        "command": ["python3", "-c", SERVER],
        "env": [
            {"name": "PORT", "value": str(port)},
            {"name": "PID_FILE", "value": str(tmp_path / "side.pid")},
            *extra.pop("env", []),
        ],
        **extra,
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def run_job(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path, init: list[dict[str, Any]]
) -> Any:
    port = int(init[0]["env"][0]["value"])
    path = manifest(CLIENT)
    job, secret = render(path, b"{}")
    pod = job["spec"]["template"]["spec"]
    pod["initContainers"] = init
    pod["containers"][0]["env"].append({"name": "PORT", "value": str(port)})
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    return job, await finished(client, job, within=60)


async def test_a_sidecar_starts_before_the_main_container_and_is_stopped_after_it(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    port = free_port()
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 30}
    init = [sidecar(tmp_path, port, startupProbe=probe, env=[{"name": "DELAY", "value": "1"}])]
    job, done = await run_job(state_dir, manifest, tmp_path, init)
    assert outcome_of(done).reason == "CompletionsReached", logs(state_dir, job)  # type: ignore[union-attr]
    assert logs(state_dir, job)["1-main.log"] == "side\n"
    pid = int((tmp_path / "side.pid").read_text())
    # The Job is Complete only once its sidecar is stopped.
    assert not alive(pid)


async def test_an_http_startup_probe_gates_the_main_container(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    port = free_port()
    probe = {"httpGet": {"port": port, "path": "/"}, "periodSeconds": 1, "failureThreshold": 30}
    init = [sidecar(tmp_path, port, startupProbe=probe, env=[{"name": "DELAY", "value": "2"}])]
    job, done = await run_job(state_dir, manifest, tmp_path, init)
    assert outcome_of(done).reason == "CompletionsReached", logs(state_dir, job)  # type: ignore[union-attr]


async def test_an_exec_readiness_probe_gates_the_main_container(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    port = free_port()
    probe = {
        "exec": {
            "command": [
                "python3",
                "-c",
                f"import os; assert os.path.exists({str(tmp_path / 'side.pid')!r})",
            ]
        },
        "periodSeconds": 1,
        "failureThreshold": 30,
    }
    init = [sidecar(tmp_path, port, readinessProbe=probe, env=[{"name": "DELAY", "value": "1.5"}])]
    job, done = await run_job(state_dir, manifest, tmp_path, init)
    assert outcome_of(done).reason == "CompletionsReached", logs(state_dir, job)  # type: ignore[union-attr]


async def test_sidecars_start_in_order(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    first, second = free_port(), free_port()
    # The second sidecar exits at once unless the first already listens.
    needs_first = f"import socket; socket.create_connection(('127.0.0.1', {first}), timeout=1)\n"
    init = [
        sidecar(
            tmp_path,
            first,
            startupProbe={"tcpSocket": {"port": first}, "periodSeconds": 1, "failureThreshold": 30},
            env=[{"name": "DELAY", "value": "1"}],
        ),
        {
            "name": "second",
            "image": "python:3.12-slim",
            "restartPolicy": "Always",
            "command": ["python3", "-c", needs_first + SERVER],
            "env": [
                {"name": "PORT", "value": str(second)},
                {"name": "PID_FILE", "value": str(tmp_path / "second.pid")},
            ],
            "startupProbe": {
                "tcpSocket": {"port": second},
                "periodSeconds": 1,
                "failureThreshold": 30,
            },
        },
    ]
    job, done = await run_job(state_dir, manifest, tmp_path, init)
    assert outcome_of(done).reason == "CompletionsReached", logs(state_dir, job)  # type: ignore[union-attr]
    assert "Traceback" not in logs(state_dir, job).get("1-second.log", "")


async def test_a_sidecar_that_never_listens_fails_the_job_naming_its_probe(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    port = free_port()
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 3}
    init = [sidecar(tmp_path, port, startupProbe=probe, env=[{"name": "DELAY", "value": "600"}])]
    job, done = await run_job(state_dir, manifest, tmp_path, init)
    outcome = outcome_of(done)
    assert outcome is not None
    assert outcome.reason == "BackoffLimitExceeded"
    assert "sidecar side: startupProbe failed 3 times" in outcome.message
    assert f"tcp 127.0.0.1:{port}" in outcome.message
    assert "1-main.log" not in logs(state_dir, job)  # the main container never started


async def test_a_sidecar_that_exits_is_restarted_while_the_main_container_runs(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    counter = tmp_path / "starts"
    flaky = f"open({str(counter)!r}, 'a').write('x'); import time; time.sleep(0.3)"
    init = [
        {
            "name": "flaky",
            "image": "busybox",
            "restartPolicy": "Always",
            "command": ["python3", "-c", flaky],
        }
    ]
    path = manifest("import time; time.sleep(4)")
    job, secret = render(path, b"{}")
    job["spec"]["template"]["spec"]["initContainers"] = init
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    done = await finished(client, job, within=60)
    assert outcome_of(done).reason == "CompletionsReached"  # type: ignore[union-attr]
    assert len(counter.read_text()) >= 2


def log_headers(state_dir: Path, job: dict[str, Any]) -> list[str]:
    """The headers ``jobrunner logs`` prints for the Job, as a user reads them."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobrunner.cli",
            "logs",
            "--local",
            "--state-dir",
            str(state_dir),
            job["metadata"]["name"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("==> attempt")]


@pytest.mark.parametrize("main_exit", [0, 1], ids=["main succeeds", "main fails"])
async def test_logs_head_a_sidecar_with_its_own_end_not_the_attempts(
    main_exit: int, state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    """The sidecar ran, and was stopped once the main container ended, whatever that
    container's exit (i21, F6: it said ``not run``, or ``main exited 1``)."""
    port = free_port()
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 30}
    path = manifest(f"{CLIENT}\nimport sys; sys.exit({main_exit})")
    job, secret = render(path, b"{}")
    pod = job["spec"]["template"]["spec"]
    pod["initContainers"] = [sidecar(tmp_path, port, startupProbe=probe)]
    pod["containers"][0]["env"].append({"name": "PORT", "value": str(port)})
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    await finished(client, job, within=60)
    assert log_headers(state_dir, job) == [
        # A Python process that SIGTERM ends, as a container runtime reports it.
        "==> attempt 1, init container side: stopped after the main containers ended: "
        "SIGTERM, exit 143 <==",
        f"==> attempt 1, container main: exit {main_exit} "
        f"({'Completed' if main_exit == 0 else 'Error'}) <==",
    ]


async def test_logs_head_a_sidecar_whose_probe_failed_with_that_probe(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    port = free_port()
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 2}
    init = [sidecar(tmp_path, port, startupProbe=probe, env=[{"name": "DELAY", "value": "600"}])]
    job, _ = await run_job(state_dir, manifest, tmp_path, init)
    assert log_headers(state_dir, job) == [
        "==> attempt 1, init container side: stopped after its startupProbe failed 2 times "
        f"(1s apart): tcp 127.0.0.1:{port}: Connection refused: SIGTERM, exit 143 <=="
    ]


async def test_logs_head_a_sidecar_stopped_after_a_later_init_container_failed(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    port = free_port()
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 30}
    failing = {"name": "setup", "image": "busybox", "command": ["python3", "-c", "exit(3)"]}
    job, _ = await run_job(
        state_dir, manifest, tmp_path, [sidecar(tmp_path, port, startupProbe=probe), failing]
    )
    assert log_headers(state_dir, job) == [
        "==> attempt 1, init container side: stopped after init container setup failed: "
        "SIGTERM, exit 143 <==",
        "==> attempt 1, init container setup: exit 3 (Error) <==",
    ]
