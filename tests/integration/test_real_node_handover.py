"""The message reaches a real container byte for byte, by env, file and args.

Each body goes through the real kubelet's `$(VAR)` expansion, containerd and runc, and
the container prints the SHA-256 and length of what it received; the test compares them
with what it published. Bodies: the hostile ones of the defects tests (quotes and
newlines, `$(VAR)` and `$$`, unicode, bytes that are not UTF-8 and hold NUL), the largest
body an environment variable may carry, 128 KiB, the largest a message may be (960 KiB,
in its Secret), and 1 MiB (refused `MessageTooLarge`, no Job).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from kubernetes import client

from jobrunner.core import limits
from tests.integration.harness import Dispatcher, drain_queue, jobs_of, publish
from tests.integration.realnode import MAX_REPLICAS, RealNode, on_real_node, pod_log, pods_of_job

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.real_node]

# What the container received, hashed inside it: the file when JOBRUNNER_MESSAGE_FILE is
# set, else $1 (mode args) or the env var, base64 for a binary body as
# JOBRUNNER_MESSAGE_ENCODING says (the argument is the variable's value).
REPORT = r"""
set -e
if [ -n "${JOBRUNNER_MESSAGE_FILE:-}" ]; then
  via=file; sum=$(sha256sum < "$JOBRUNNER_MESSAGE_FILE"); n=$(wc -c < "$JOBRUNNER_MESSAGE_FILE")
elif [ "$#" -gt 0 ] && [ "${JOBRUNNER_MESSAGE_ENCODING:-utf-8}" = base64 ]; then
  via=args-base64; sum=$(printf '%s' "$1" | base64 -d | sha256sum)
  n=$(printf '%s' "$1" | base64 -d | wc -c)
elif [ "$#" -gt 0 ]; then
  via=args; sum=$(printf '%s' "$1" | sha256sum); n=$(printf '%s' "$1" | wc -c)
elif [ "${JOBRUNNER_MESSAGE_ENCODING:-utf-8}" = base64 ]; then
  via=env-base64; sum=$(printf '%s' "$JOBRUNNER_MESSAGE" | base64 -d | sha256sum)
  n=$(printf '%s' "$JOBRUNNER_MESSAGE" | base64 -d | wc -c)
else
  via=env; sum=$(printf '%s' "$JOBRUNNER_MESSAGE" | sha256sum)
  n=$(printf '%s' "$JOBRUNNER_MESSAGE" | wc -c)
fi
echo "received id=$JOBRUNNER_MESSAGE_ID via=$via sha256=${sum%% *} bytes=$n"
"""

ENV_MOST = limits.env_value_max("JOBRUNNER_MESSAGE")

HOSTILE: dict[str, bytes] = {
    "quotes": b'it\'s "quoted" `ticked` \\back\\slashed\\ \'single\' """',
    "newlines": b"line 1\nline 2\r\n\ttabbed\n\n trailing newline\n",
    "dollars": b"$(HOME) $$(HOME) $$ $ ${PATH} $(JOBRUNNER_MESSAGE_ID) $(DB_PASSWORD) $",
    "unicode": "h\u00e9llo \u2713 \U0001f600 \u202eright-to-left\u202c \u0000".replace(
        "\u0000", ""
    ).encode(),
    "json": json.dumps({"cmd": "echo $(SECRET)", "q": "'\"", "nl": "a\nb"}).encode(),
    "binary": bytes(range(256)),
}


def _scaledjob(
    name: str, namespace: str, queue: str, url: str, node: RealNode, **delivery: Any
) -> dict[str, Any]:
    args: list[str] = ["-c", REPORT, "report"]
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "maxReplicaCount": MAX_REPLICAS,
            "jobTargetRef": on_real_node(
                node, [{"name": "work", "image": "busybox", "command": ["sh"], "args": args}]
            ),
            "messageDelivery": delivery,
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
        },
    }


async def _declare(url: str, *queues: str) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for q in queues:
            await channel.declare_queue(q, durable=True)


async def _reports(
    kube_api: client.ApiClient, namespace: str, scaledjob: str
) -> dict[str, dict[str, str]]:
    """Message id -> what its container reported, for every finished Job."""
    out: dict[str, dict[str, str]] = {}
    for job in await asyncio.to_thread(jobs_of, kube_api, namespace, scaledjob):
        for pod in await asyncio.to_thread(pods_of_job, kube_api, namespace, job.metadata.name):
            if pod.status.phase not in ("Succeeded", "Failed"):
                continue
            text = await pod_log(kube_api, namespace, pod.metadata.name, "work")
            match = re.search(r"received id=(\S*) via=(\S+) sha256=(\w+) bytes=\s*(\d+)", text)
            if match:
                out[match[1]] = {"via": match[2], "sha256": match[3], "bytes": match[4]}
    return out


async def test_bodies_arrive_byte_exact_by_env_file_and_args_on_a_real_kubelet(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    real_node: RealNode,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
    unique_name: str,
) -> None:
    queues = {mode: f"{unique_name}-{mode}" for mode in ("env", "file", "args")}
    await _declare(rabbitmq_url, *queues.values())
    docs = [
        _scaledjob(
            "by-env",
            namespace,
            queues["env"],
            rabbitmq_url,
            real_node,
            mode="env",
            maxEnvBytes=ENV_MOST,
        ),
        _scaledjob(
            "by-file",
            namespace,
            queues["file"],
            rabbitmq_url,
            real_node,
            mode="file",
            maxMessageBytes=limits.MESSAGE_MAX,
        ),
        _scaledjob(
            "by-args",
            namespace,
            queues["args"],
            rabbitmq_url,
            real_node,
            mode="args",
            maxEnvBytes=ENV_MOST,
        ),
    ]
    path = tmp_path / "handover.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    dispatcher = dispatchers(path)

    expected: dict[str, dict[str, bytes]] = {mode: dict(HOSTILE) for mode in queues}
    # The largest body an env var carries (Linux' MAX_ARG_STRLEN less the name), exactly.
    expected["env"]["env-most"] = b"e" * ENV_MOST
    expected["args"]["env-most"] = b"a" * ENV_MOST
    expected["file"]["kib-128"] = bytes(i % 251 for i in range(128 * 1024))
    expected["file"]["message-most"] = b"m" * limits.MESSAGE_MAX
    for mode, bodies in expected.items():
        for case, body in bodies.items():
            await publish(rabbitmq_url, queues[mode], body, message_id=f"{mode}-{case}")
    # 1 MiB is more than any message may be: refused before any Job, nothing lost.
    await publish(rabbitmq_url, queues["file"], b"x" * (1 << 20), message_id="file-mib")

    total = sum(len(b) for b in expected.values())
    await dispatcher.settled("ack", total, within=300)
    await dispatcher.settled("dead-letter", 1, within=60)

    for mode, scaledjob in (("env", "by-env"), ("file", "by-file"), ("args", "by-args")):
        reports = await _reports(kube_api, namespace, scaledjob)
        for case, body in expected[mode].items():
            got = reports.get(f"{mode}-{case}")
            assert got is not None, f"{mode}/{case}: no report in its pod's log ({sorted(reports)})"
            assert got["sha256"] == hashlib.sha256(body).hexdigest(), f"{mode}/{case}: {got}"
            assert int(got["bytes"]) == len(body), f"{mode}/{case}: {got}"
        kinds = {r["via"] for r in reports.values()}
        assert kinds == ({"file"} if mode == "file" else {mode, f"{mode}-base64"}), (mode, kinds)
        if mode != "file":
            assert reports[f"{mode}-binary"]["via"] == f"{mode}-base64"

    dead = await drain_queue(rabbitmq_url, f"{queues['file']}.dead-letter", wait=10)
    assert [m.message_id for m in dead] == ["file-mib"]
    assert "MessageTooLarge" in json.dumps(dict(dead[0].headers or {}), default=str)
    assert not [
        j
        for j in jobs_of(kube_api, namespace, "by-file")
        if j.metadata.annotations.get("jobrunner.dev/message-id") == "file-mib"
    ]
