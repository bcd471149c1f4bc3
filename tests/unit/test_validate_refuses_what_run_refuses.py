"""``jobrunner validate`` fails on everything ``run`` or the API server would refuse, and
loads a KEDA user's file (other kinds beside the ScaledJob) unchanged."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.cli import main
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.triggers import FileSecrets, Reach, ResolveContext, resolve_trigger

JOB = {
    "template": {
        "spec": {
            "containers": [{"name": "w", "image": "busybox", "args": ["{{ message.json.task }}"]}]
        }
    }
}


def scaledjob(trigger: dict[str, Any], job: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work"},
        "spec": {"jobTargetRef": job or JOB, "triggers": [trigger]},
    }


def validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *docs: dict[str, Any], extra: list[str]
) -> tuple[int, str, str]:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    code = main(["validate", "-f", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


RABBIT = {"type": "rabbitmq", "metadata": {"queueName": "jobs", "host": "amqp://mq:5672/"}}


@pytest.mark.parametrize(
    ("trigger", "says"),
    [
        (
            {"type": "sqlit", "metadata": {"queueName": "q"}},
            "'sqlit' is not supported; did you mean 'sqlite'?",
        ),
        ({"type": "redis", "metadata": {"listName": "q"}}, "'redis' is not supported"),
        (
            {"type": "azure-servicebus", "metadata": {"queueName": "q"}},
            "'azure-servicebus' is not supported",
        ),
        (
            {"type": "rabbitmq", "metadata": {"queueNam": "jobs", "host": "amqp://mq/"}},
            "field spec.triggers[0].metadata.queueNam: unknown rabbitmq trigger metadata key; "
            "did you mean 'queueName'?",
        ),
        (
            {"type": "rabbitmq", "metadata": {"queueNam": "jobs", "host": "amqp://mq/"}},
            "field spec.triggers[0].metadata.queueName: required; add it",
        ),
        (
            {"type": "rabbitmq", "metadata": {"queueName": "jobs"}},
            "field spec.triggers[0].metadata.host: give host, hostFromEnv or an authenticationRef",
        ),
        (
            {"type": "rabbitmq", "metadata": {"queueName": "jobs", "host": "http://mq:15672/"}},
            "use an amqp:// or amqps:// URL",
        ),
        (
            {
                "type": "kafka",
                "metadata": {
                    "topic": "t",
                    "consumerGroup": "g",
                    "bootstrapServers": "k:9092",
                    "offsetResetPolicy": "oldest",
                },
            },
            "field spec.triggers[0].metadata.offsetResetPolicy: one of earliest, latest",
        ),
    ],
)
def test_trigger_mistakes_fail_validate_with_their_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trigger: dict[str, Any], says: str
) -> None:
    code, _, err = validate(tmp_path, capsys, scaledjob(trigger), extra=[])
    assert code == 2
    assert says in err, err
    assert "line " in err
    assert "Traceback" not in err


def test_an_undefined_name_in_a_template_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = {
        "template": {
            "spec": {"containers": [{"name": "w", "image": "b", "args": ["{{ mesage.json.x }}"]}]}
        }
    }
    code, _, err = validate(tmp_path, capsys, scaledjob(RABBIT, job), extra=[])
    assert code == 2
    assert "unknown name 'mesage'" in err


def test_validate_renders_the_sample_message_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = validate(
        tmp_path, capsys, scaledjob(RABBIT), extra=["--sample-message", '{"task": "t"}']
    )
    assert code == 0
    assert "the sample message renders a valid Job" in out
    code, _, err = validate(
        tmp_path, capsys, scaledjob(RABBIT), extra=["--sample-message", '{"other": 1}']
    )
    assert code == 2
    assert "TemplateError" in err
    assert "spec.jobTargetRef.template.spec.containers[0].args[0]" in err


def test_other_kinds_in_the_file_are_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mq"},
        "stringData": {"host": "amqp://u:p@mq/"},
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {"a": "b"},
    }
    auth = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "mq-auth"},
        "spec": {"secretTargetRef": [{"parameter": "host", "name": "mq", "key": "host"}]},
    }
    trigger = {
        "type": "rabbitmq",
        "metadata": {"queueName": "jobs"},
        "authenticationRef": {"name": "mq-auth"},
    }
    code, out, err = validate(
        tmp_path,
        capsys,
        secret,
        config_map,
        auth,
        scaledjob(trigger),
        extra=["--sample-message", '{"task": "t"}'],
    )
    assert code == 0, err
    assert "ScaledJob default/work: valid" in out
    assert "note: skipped ConfigMap settings (document 2)" in err


def test_a_secret_in_the_file_serves_its_trigger_authentication_when_the_cluster_has_none(
    tmp_path: Path,
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mq"},
        "stringData": {"host": "amqp://u:p@mq:5672/"},
    }
    auth = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "mq-auth"},
        "spec": {"secretTargetRef": [{"parameter": "host", "name": "mq", "key": "host"}]},
    }
    trigger = {
        "type": "rabbitmq",
        "metadata": {"queueName": "jobs"},
        "authenticationRef": {"name": "mq-auth"},
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all([secret, auth, scaledjob(trigger)]))
    manifests = load_manifest(path)

    async def none_in_cluster(namespace: str, name: str) -> None:
        return None

    async def resolve(reader: Any) -> Any:
        context = ResolveContext(
            scaledjob=manifests.scaledjobs[0],
            trigger=manifests.scaledjobs[0].spec.triggers[0],
            authentications=manifests.authentications,
            read_secret=reader,
            state_dir=tmp_path,
            reach=Reach.own(os.environ),
        )
        return (await resolve_trigger(context))[1]

    resolved = asyncio.run(resolve(FileSecrets(none_in_cluster, manifests.secrets)))
    assert resolved.url == "amqp://u:p@mq:5672/"
    assert resolved.queue == "jobs"

    async def cluster_has_one(namespace: str, name: str) -> dict[str, str]:
        import base64

        return {"host": base64.b64encode(b"amqp://cluster:5672/").decode()}

    # The cluster's Secret wins over the file's.
    resolved = asyncio.run(resolve(FileSecrets(cluster_has_one, manifests.secrets)))
    assert resolved.url == "amqp://cluster:5672/"


def _named(name: str, **meta: Any) -> dict[str, Any]:
    doc = scaledjob(RABBIT)
    doc["metadata"] = {"name": name, **meta}
    return doc


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        # Names that the API server refuses for every Job made from them (DNS-1123).
        (_named("a b"), "field metadata.name: it must be lowercase letters, digits and '-'"),
        (_named("Thumbnails_Bad"), "got 'Thumbnails_Bad', as Kubernetes requires"),
        (_named("-lead"), "field metadata.name: it must be lowercase"),
        (_named("ok", namespace="Bad NS"), "field metadata.namespace: it must be lowercase"),
        (_named("ok", namespace="n" * 64), "field metadata.namespace: String should have at most"),
        # A Job's pods restart OnFailure or Never: Always is a PodSpec's value, not a Job's.
        (
            scaledjob(
                RABBIT,
                {"template": {"spec": {**JOB["template"]["spec"], "restartPolicy": "Always"}}},
            ),
            "field spec.jobTargetRef.template.spec.restartPolicy: a Job's pods must have "
            "restartPolicy OnFailure or Never, got 'Always'",
        ),
        # A second trigger would be ignored: refused instead, naming what to do.
        (
            {**scaledjob(RABBIT), "spec": {"jobTargetRef": JOB, "triggers": [RABBIT, RABBIT]}},
            "field spec.triggers: Value error, 2 triggers; jobrunner consumes one source per "
            "ScaledJob",
        ),
    ],
)
def test_what_kubernetes_refuses_for_every_job_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], says: str
) -> None:
    code, _, err = validate(tmp_path, capsys, doc, extra=[])
    assert code == 2, err
    assert says in err
    assert "Traceback" not in err


def test_two_scaledjobs_of_one_name_in_a_file_fail_validate_naming_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = validate(tmp_path, capsys, _named("twice"), _named("twice"), extra=[])
    assert code == 2, err
    assert "field metadata.name: a second ScaledJob 'twice' in namespace 'default'" in err
    assert "(the first is at line 4)" in err


def test_a_restart_policy_the_job_allows_and_a_templated_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for policy in ("OnFailure", "Never", "{{ message.json.policy }}"):
        spec = {"template": {"spec": {**JOB["template"]["spec"], "restartPolicy": policy}}}
        code, _, err = validate(tmp_path, capsys, scaledjob(RABBIT, spec), extra=[])
        assert code == 0, (policy, err)
