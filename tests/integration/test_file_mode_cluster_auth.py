"""File mode with the cluster's TriggerAuthentications, on the API server and RabbitMQ:
a ScaledJob kept in a file whose TriggerAuthentication (and Secret) were applied to the
cluster once, as kubectl users keep them, is served by `run -f` and listed by
`dead-letters -f`; a name that is in neither place is one error naming both."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from jobrunner.cli import main
from tests.integration.harness import busybox_job, publish, wait_for_jobs

pytestmark = [
    pytest.mark.kube,
    pytest.mark.rabbitmq,
    pytest.mark.usefixtures("jobrunner_crds"),
]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cluster_auth(kube_api: client.ApiClient, namespace: str, rabbitmq_url: str) -> str:
    """A TriggerAuthentication `broker` in the test's namespace whose Secret holds the
    broker's address (the file never has it)."""
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="broker"),
            data={"host": base64.b64encode(rabbitmq_url.encode()).decode()},
        ),
    )
    client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "jobrunner.dev", "v1alpha1", namespace, "triggerauthentications",
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "broker", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": "broker", "key": "host"}]},
        },
    )  # fmt: skip
    return "broker"


def manifest(tmp_path: Path, namespace: str, queue: str, auth: str) -> Path:
    path = tmp_path / f"{auth}.yaml"
    trigger = {"type": "rabbitmq", "metadata": {"queueName": queue}}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "jobrunner.dev/v1alpha1",
                "kind": "ScaledJob",
                "metadata": {"name": "work", "namespace": namespace},
                "spec": {
                    "jobTargetRef": busybox_job(),
                    "triggers": [{**trigger, "authenticationRef": {"name": auth}}],
                },
            }
        )
    )
    return path


async def test_run_serves_a_file_whose_trigger_authentication_is_the_clusters(
    kube_api: client.ApiClient,
    rabbitmq_url: str,
    queue: str,
    namespace: str,
    tmp_path: Path,
    cluster_auth: str,
    dispatchers: Any,
) -> None:
    dispatchers(manifest(tmp_path, namespace, queue, cluster_auth))
    await publish(rabbitmq_url, queue, json.dumps({"task": "a"}).encode(), message_id="a")
    (job,) = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    assert job.metadata.annotations["jobrunner.dev/message-id"] == "a"


async def test_dead_letters_of_a_file_use_the_clusters_trigger_authentication(
    kubeconfig: Path,
    queue: str,
    namespace: str,
    tmp_path: Path,
    cluster_auth: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--kubeconfig", str(kubeconfig), "dead-letters", "-f"]
    path = str(manifest(tmp_path, namespace, queue, cluster_auth))
    code, out, err = await asyncio.to_thread(cli, capsys, *base, path)
    assert code == 0, err
    # The broker was reached at the Secret's address (the file has none).
    assert f"no dead letters in queue {queue}.dead-letter on RabbitMQ" in " ".join(out.split())


@pytest.mark.parametrize("command", ["dead-letters", "run"])
def test_a_trigger_authentication_in_neither_place_is_one_error_naming_both(
    kubeconfig: Path,
    queue: str,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    path = manifest(tmp_path, namespace, queue, "nowhere")
    # In the main thread: `run` sets its signal handlers.
    code, _, err = cli(capsys, "--kubeconfig", str(kubeconfig), command, "-f", str(path))
    assert code == 2, err
    assert (
        "field spec.triggers[0].authenticationRef.name: TriggerAuthentication 'nowhere' is "
        f"neither in {path} nor in namespace {namespace} of the cluster "
        "(triggerauthentications.jobrunner.dev)"
    ) in err
