"""Proof that each service of the local stack is the real thing and behaves as the
product relies on: Jobs reach Complete/Failed through the real Job controller and
scheduler (pods run on the KWOK node), TTL and owner-reference GC delete what they
should, and RabbitMQ and Kafka carry a message end to end."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.helpers import wait_until

FAIL_ANNOTATION = "kwok.jobrunner.dev/outcome"


def make_job(name: str, *, fail: bool = False, ttl: int | None = None) -> client.V1Job:
    annotations = {FAIL_ANNOTATION: "failed"} if fail else {}
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=0,
            ttl_seconds_after_finished=ttl,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations=annotations),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="work", image="busybox:1.36")],
                ),
            ),
        ),
    )


def conditions(batch: client.BatchV1Api, namespace: str, name: str) -> dict[str, str]:
    job = batch.read_namespaced_job(name, namespace)
    return {c.type: c.reason for c in (job.status.conditions or []) if c.status == "True"}


def job_gone(batch: client.BatchV1Api, namespace: str, name: str) -> bool:
    try:
        batch.read_namespaced_job(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def wait_for_default_service_account(
    core: client.CoreV1Api, namespace: str, *, timeout: float = 30
) -> None:
    """The ServiceAccount admission plugin rejects pods until the controller made
    ``default`` in ``namespace``: wait for it, at most ``timeout`` seconds."""

    def exists() -> bool:
        try:
            core.read_namespaced_service_account("default", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_until(exists, timeout=timeout)


@pytest.mark.kube
def test_job_completes_on_kwok_node(kube_api: client.ApiClient, namespace: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    wait_for_default_service_account(core, namespace)
    batch.create_namespaced_job(namespace, make_job("completes"))

    reached = wait_until(
        lambda: conditions(batch, namespace, "completes").get("Complete"), timeout=60
    )
    assert reached == "CompletionsReached"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=completes").items
    assert [p.status.phase for p in pods] == ["Succeeded"]
    # Bound by the real scheduler to the node KWOK simulates.
    assert pods[0].spec.node_name == "kwok-node-0"


@pytest.mark.kube
def test_job_fails_when_pod_template_asks(kube_api: client.ApiClient, namespace: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    wait_for_default_service_account(core, namespace)
    batch.create_namespaced_job(namespace, make_job("fails", fail=True))

    reached = wait_until(lambda: conditions(batch, namespace, "fails").get("Failed"), timeout=60)
    assert reached == "BackoffLimitExceeded"
    assert "Complete" not in conditions(batch, namespace, "fails")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=fails").items
    assert [p.status.phase for p in pods] == ["Failed"]
    terminated = pods[0].status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1


@pytest.mark.kube
def test_finished_job_is_deleted_after_its_ttl(kube_api: client.ApiClient, namespace: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    wait_for_default_service_account(core, namespace)
    batch.create_namespaced_job(namespace, make_job("short-lived", ttl=5))

    wait_until(lambda: conditions(batch, namespace, "short-lived").get("Complete"), timeout=60)
    wait_until(lambda: job_gone(batch, namespace, "short-lived"), timeout=60)
    # Its pod goes with it: GC deletes it and KWOK's pod-delete stage finishes the job.
    wait_until(
        lambda: (
            not core.list_namespaced_pod(namespace, label_selector="job-name=short-lived").items
        ),
        timeout=60,
    )


@pytest.mark.kube
def test_owned_objects_are_garbage_collected(kube_api: client.ApiClient, namespace: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    job = batch.create_namespaced_job(
        namespace,
        client.V1Job(
            metadata=client.V1ObjectMeta(name="owner"),
            spec=client.V1JobSpec(suspend=True, template=make_job("x").spec.template),
        ),
    )
    owner = client.V1OwnerReference(
        api_version="batch/v1", kind="Job", name="owner", uid=job.metadata.uid
    )
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="owned", owner_references=[owner]),
            string_data={"body": "x"},
        ),
    )
    batch.delete_namespaced_job("owner", namespace, propagation_policy="Background")

    def secret_gone() -> bool:
        try:
            core.read_namespaced_secret("owned", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(secret_gone, timeout=60)


@pytest.mark.rabbitmq
async def test_rabbitmq_round_trip(rabbitmq_url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"smoke-{uuid.uuid4().hex}", auto_delete=True)
        body = uuid.uuid4().bytes
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id="m-1", headers={"h": "v"}), routing_key=queue.name
        )
        message = await queue.get(timeout=10, fail=True)
        assert message is not None
        async with message.process():
            assert message.body == body
            assert message.message_id == "m-1"
            assert message.headers == {"h": "v"}


@pytest.mark.kafka
async def test_kafka_round_trip(kafka_bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"smoke-{uuid.uuid4().hex}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"payload", key=b"k", headers=[("h", b"v")])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=60)
    finally:
        await consumer.stop()
    assert (record.key, record.value, list(record.headers)) == (b"k", b"payload", [("h", b"v")])
