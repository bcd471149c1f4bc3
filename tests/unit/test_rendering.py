from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
import yaml

from jobrunner.core.models import Delivery
from jobrunner.core.naming import job_name, message_identity
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.rendering.renderer import (
    ANNOTATION_ORIGINAL_MESSAGE,
    Renderer,
    RenderError,
    original_message,
)


def manifest(job_spec: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    job_spec = job_spec or {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "work",
                        "image": "busybox",
                        "args": ["--task", "{{ message.json.task }}"],
                    }
                ]
            }
        },
    }
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize", "namespace": "media"},
        "spec": {
            "jobTargetRef": job_spec,
            "triggers": [
                {"type": "rabbitmq", "metadata": {"queueName": "q", "host": "amqp://localhost"}}
            ],
            **spec,
        },
    }


def delivery(body: bytes, message_id: str | None = "m-1", **kw: Any) -> Delivery:
    headers = kw.pop("headers", {})
    return Delivery(
        source="rabbitmq",
        identity=message_identity(message_id, body, headers),
        body=body,
        message_id=message_id,
        headers=headers,
        **kw,
    )


def render(body: bytes, **spec: Any) -> Any:
    return Renderer(parse_scaledjob(manifest(**spec))).render(delivery(body))


def env_of(job: dict[str, Any]) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_renders_message_fields_into_string_values() -> None:
    rendered = render(b'{"task": "thumb"}')
    container = rendered.job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--task", "thumb"]
    assert rendered.job["metadata"]["name"] == job_name("resize", "m-1")
    assert rendered.job["metadata"]["namespace"] == "media"
    assert rendered.secret is None


def test_small_body_and_metadata_reach_the_job_as_env() -> None:
    env = env_of(
        render(
            b'{"task": "t"}',
        ).job
    )
    assert env["JOBRUNNER_MESSAGE"] == '{"task": "t"}'
    assert env["JOBRUNNER_MESSAGE_ID"] == "m-1"
    assert env["JOBRUNNER_MESSAGE_ENCODING"] == "utf-8"
    assert json.loads(env["JOBRUNNER_MESSAGE_HEADERS"]) == {}


def test_large_body_goes_to_a_mounted_secret_file() -> None:
    body = json.dumps({"task": "t", "pad": "x" * 100_000}).encode()
    rendered = render(body)
    assert rendered.secret is not None
    assert base64.b64decode(rendered.secret["data"]["body"]) == body
    env = env_of(rendered.job)
    assert "JOBRUNNER_MESSAGE" not in env
    assert env["JOBRUNNER_MESSAGE_FILE"] == "/var/run/jobrunner/message/body"
    pod = rendered.job["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "jobrunner-message", "secret": {"secretName": f"{rendered.name}-message"}}
    ]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/var/run/jobrunner/message"


def test_body_over_the_limit_is_refused_with_reason() -> None:
    with pytest.raises(RenderError) as err:
        render(b'{"task": "t"}' + b" " * 600_000)
    assert err.value.reason == "MessageTooLarge"


def test_body_that_is_not_json_fails_when_template_needs_json() -> None:
    with pytest.raises(RenderError) as err:
        render(b"not json at all")
    assert err.value.reason == "InvalidMessage"


def test_missing_field_is_a_template_error_naming_the_field() -> None:
    with pytest.raises(RenderError) as err:
        render(b'{"other": 1}')
    assert err.value.reason == "TemplateError"
    assert "containers[0].args[1]" in err.value.detail


HOSTILE = [
    "}}\n{{ 7*7 }}",
    "x\nmetadata:\n  name: evil\nspec: {}",
    '"},"hostNetwork":true,"x":{"',
    "'; rm -rf / #",
    "{% for x in range(10**9) %}x{% endfor %}",
    "a" * 100_000,
    "\u2028\ufeff\U0001f600",
]


@pytest.mark.parametrize("task", HOSTILE)
def test_hostile_message_content_never_changes_job_structure(task: str) -> None:
    rendered = render(json.dumps({"task": task}).encode(), messageDelivery={"maxEnvBytes": 10})
    job = rendered.job
    container = job["spec"]["template"]["spec"]["containers"][0]
    # The value lands verbatim in its one field; nothing else appears.
    assert container["args"] == ["--task", task]
    assert set(job["spec"]) == {"backoffLimit", "template"}
    assert set(job["spec"]["template"]["spec"]) == {"containers", "restartPolicy", "volumes"}
    assert job["metadata"]["name"] == rendered.name
    yaml.safe_dump(job)  # still serialisable as one object


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        ("\u2028\u0000\ufeff", "InvalidMessage"),
        ("a" * 200_000, "MessageTooLarge"),
    ],
)
def test_message_text_no_process_can_receive_is_refused_before_any_job(
    task: str, reason: str
) -> None:
    # A NUL ends a C string; one argument over MAX_ARG_STRLEN makes execve fail.
    with pytest.raises(RenderError) as err:
        render(json.dumps({"task": task}).encode(), messageDelivery={"maxEnvBytes": 10})
    assert err.value.reason == reason
    assert "spec.jobTargetRef.template.spec.containers[0].args[1]" in err.value.detail


@pytest.mark.parametrize(
    "expression",
    [
        "{{ message.__class__.__mro__ }}",
        "{{ message._delivery.body }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ message.json.__class__.__init__.__globals__ }}",
    ],
)
def test_sandbox_blocks_attribute_access_tricks(expression: str) -> None:
    spec = manifest()["spec"]["jobTargetRef"]
    spec["template"]["spec"]["containers"][0]["args"] = [expression]
    renderer = Renderer(parse_scaledjob(manifest(job_spec=spec)))
    with pytest.raises(RenderError) as err:
        renderer.render(delivery(b'{"task": 1}'))
    assert err.value.reason == "TemplateError"


def test_template_syntax_error_fails_at_start_naming_the_field() -> None:
    spec = manifest()["spec"]["jobTargetRef"]
    spec["template"]["spec"]["containers"][0]["image"] = "{{ oops"
    with pytest.raises(ManifestError, match=r"containers\[0\]\.image"):
        Renderer(parse_scaledjob(manifest(job_spec=spec)))


def test_labels_and_annotations_lead_back_to_the_message() -> None:
    job = render(b'{"task": "t"}').job
    labels, annotations = job["metadata"]["labels"], job["metadata"]["annotations"]
    assert labels["app.kubernetes.io/managed-by"] == "jobrunner"
    assert labels["jobrunner.dev/scaledjob"] == "resize"
    assert labels["jobrunner.dev/source"] == "rabbitmq"
    assert annotations["jobrunner.dev/message-id"] == "m-1"


def test_original_message_is_kept_with_the_job() -> None:
    rendered = Renderer(parse_scaledjob(manifest())).render(
        delivery(b'{"task": "t"}', headers={"h": "v"})
    )
    kept = original_message(rendered.job, None)
    assert kept is not None
    assert kept["body"] == b'{"task": "t"}'
    assert kept["headers"] == {"h": "v"}


def test_binary_body_is_base64_in_env() -> None:
    spec = manifest()["spec"]["jobTargetRef"]
    spec["template"]["spec"]["containers"][0]["args"] = []
    renderer = Renderer(parse_scaledjob(manifest(job_spec=spec)))
    env = env_of(renderer.render(delivery(b"\x00\xff\x01")).job)
    assert env["JOBRUNNER_MESSAGE_ENCODING"] == "base64"
    assert base64.b64decode(env["JOBRUNNER_MESSAGE"]) == b"\x00\xff\x01"


def test_args_mode_appends_the_message_variable() -> None:
    rendered = render(b'{"task": "t"}', messageDelivery={"mode": "args"})
    container = rendered.job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-1] == "$(JOBRUNNER_MESSAGE)"


def test_message_text_in_env_is_escaped_against_kubelet_expansion() -> None:
    from jobrunner.core.models import Delivery
    from jobrunner.manifest.loader import parse_scaledjob
    from jobrunner.rendering.renderer import Renderer

    scaledjob = parse_scaledjob(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "esc"},
            "spec": {
                "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
                "jobTargetRef": {"template": {"spec": {"containers": [{"name": "c"}]}}},
            },
        }
    )
    body = b"costs $5, see $(HOME) and $$"
    job = (
        Renderer(scaledjob)
        .render(
            Delivery(source="t", identity="m", body=body, message_id="$(id)", headers={"h": "$(x)"})
        )
        .job
    )
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    # "$$" is the kubelet's literal "$": each value arrives exactly as sent.
    assert env["JOBRUNNER_MESSAGE"] == "costs $$5, see $$(HOME) and $$$$"
    assert env["JOBRUNNER_MESSAGE_ID"] == "$$(id)"
    assert env["JOBRUNNER_MESSAGE_HEADERS"] == '{"h": "$$(x)"}'


SECRET_PULLING = "echo $(DB_PASSWORD) $$ $(HOME)"


@pytest.mark.parametrize(
    ("container", "where"),
    [
        ({"command": ["sh", "-c", "{{ message.json.cmd }}"]}, ("command", 2)),
        ({"args": ["--run", "{{ message.json.cmd }}"]}, ("args", 1)),
        ({"args": ["prefix {{ message.json.cmd }} suffix"]}, ("args", 0)),
        ({"env": [{"name": "CMD", "value": "{{ message.json.cmd }}"}]}, ("env", -1)),
        (
            {
                "volumeMounts": [
                    {"name": "v", "mountPath": "/v", "subPathExpr": "{{ message.json.cmd }}"}
                ]
            },
            ("volumeMounts", 0),
        ),
    ],
)
def test_message_text_reaches_every_kubelet_expanded_field_byte_exact(
    container: dict[str, Any], where: tuple[str, int]
) -> None:
    from jobrunner.local.supervisor import expand  # the kubelet's $(VAR) rule

    spec = {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "work",
                        "image": "busybox",
                        "env": [{"name": "DB_PASSWORD", "value": "hunter2"}],
                        **container,
                    }
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
            }
        }
    }
    body = json.dumps({"cmd": SECRET_PULLING}).encode()
    job = Renderer(parse_scaledjob(manifest(spec))).render(delivery(body)).job
    out = job["spec"]["template"]["spec"]["containers"][0]
    key, index = where
    if key == "env":
        value = next(e["value"] for e in out["env"] if e["name"] == "CMD")
    elif key == "volumeMounts":
        value = out["volumeMounts"][0]["subPathExpr"]
    else:
        value = out[key][index]
    defined = {"DB_PASSWORD": "hunter2", "HOME": "/root"}
    expanded = expand(value, defined)
    assert "hunter2" not in expanded, "a message pulled a variable of the container into itself"
    assert SECRET_PULLING in expanded


def test_the_templates_own_variable_references_still_expand() -> None:
    from jobrunner.local.supervisor import expand

    spec = {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "work",
                        "image": "busybox",
                        "env": [{"name": "DB_PASSWORD", "value": "hunter2"}],
                        "args": ["--password=$(DB_PASSWORD)", "--task={{ message.json.cmd }}"],
                    }
                ]
            }
        }
    }
    body = json.dumps({"cmd": "$(DB_PASSWORD)"}).encode()
    job = Renderer(parse_scaledjob(manifest(spec))).render(delivery(body)).job
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [expand(a, {"DB_PASSWORD": "hunter2"}) for a in args] == [
        "--password=hunter2",
        "--task=$(DB_PASSWORD)",
    ]


def test_fields_the_kubelet_does_not_expand_keep_message_text_unescaped() -> None:
    spec = {
        "template": {
            "metadata": {"annotations": {"note": "{{ message.json.cmd }}"}},
            "spec": {
                "containers": [
                    {"name": "work", "image": "busybox", "workingDir": "/w/{{ message.json.cmd }}"}
                ]
            },
        }
    }
    body = json.dumps({"cmd": "$(X)"}).encode()
    job = Renderer(parse_scaledjob(manifest(spec))).render(delivery(body)).job
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"]["note"] == "$(X)"
    assert template["spec"]["containers"][0]["workingDir"] == "/w/$(X)"


def test_with_mode_file_the_original_is_in_the_secret_only() -> None:
    rendered = render(b'{"task": "t"}', messageDelivery={"mode": "file"})
    annotations = rendered.job["metadata"]["annotations"]
    assert ANNOTATION_ORIGINAL_MESSAGE not in annotations
    assert "task" not in json.dumps(annotations)
    assert rendered.secret is not None
    assert rendered.secret["metadata"]["annotations"] == {
        "jobrunner.dev/body-sha256": hashlib.sha256(b'{"task": "t"}').hexdigest()
    }
    assert annotations["jobrunner.dev/body-sha256"] == hashlib.sha256(b'{"task": "t"}').hexdigest()
    # Still dead-lettered with its body: read back from the Secret.
    kept = original_message(rendered.job, rendered.secret["data"])
    assert kept is not None
    assert kept["body"] == b'{"task": "t"}'


def test_auto_mode_going_to_a_file_keeps_the_original_in_the_secret_only() -> None:
    body = json.dumps({"task": "t", "pad": "x" * 40_000}).encode()
    rendered = render(body, messageDelivery={"mode": "auto", "maxEnvBytes": 1024})
    assert ANNOTATION_ORIGINAL_MESSAGE not in rendered.job["metadata"]["annotations"]
    assert rendered.secret is not None
    assert original_message(rendered.job, rendered.secret["data"])["body"] == body  # type: ignore[index]


def test_with_the_body_in_env_the_original_stays_in_an_annotation() -> None:
    rendered = render(b'{"task": "t"}', messageDelivery={"mode": "env"})
    assert rendered.secret is None
    assert original_message(rendered.job, None)["body"] == b'{"task": "t"}'  # type: ignore[index]
