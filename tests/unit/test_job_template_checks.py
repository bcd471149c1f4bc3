"""The Job template against the batch/v1 schema: what ``validate`` and ``run`` refuse at
start (naming the field and its line), and how rendered values land in their field's
type or make the message a ``TemplateError``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.core.models import Delivery
from jobrunner.manifest.loader import load_manifest, parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.rendering.renderer import Renderer, RenderError, template_dirs

CONTAINER = {"name": "work", "image": "busybox", "command": ["run"]}


def write(tmp_path: Path, job_spec: Any, **spec: Any) -> Path:
    doc = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize"},
        "spec": {
            "jobTargetRef": job_spec,
            "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
            **spec,
        },
    }
    path = tmp_path / "scaledjob.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def refused(tmp_path: Path, job_spec: Any) -> str:
    path = write(tmp_path, job_spec)
    with pytest.raises(ManifestError) as err:
        Renderer(load_manifest(path).scaledjobs[0], base_dirs=[tmp_path])
    return str(err.value)


def pod(**container: Any) -> dict[str, Any]:
    return {"template": {"spec": {"containers": [{**CONTAINER, **container}]}}}


@pytest.mark.parametrize(
    ("job_spec", "field", "says"),
    [
        (
            {**pod(), "activeDeadlineSeconds": "1m"},
            "spec.jobTargetRef.activeDeadlineSeconds",
            "expected an integer, got the string '1m'",
        ),
        (
            {**pod(), "backoffLimit": "two"},
            "spec.jobTargetRef.backoffLimit",
            "expected an integer",
        ),
        (
            pod(env={"A": "b"}),
            "spec.jobTargetRef.template.spec.containers[0].env",
            "expected a list, got a mapping",
        ),
        (
            pod(args=[1, 2]),
            "spec.jobTargetRef.template.spec.containers[0].args[0]",
            "expected a string, got int 1; quote it",
        ),
        (
            pod(command="run --fast"),
            "spec.jobTargetRef.template.spec.containers[0].command",
            "expected a list, got the string 'run --fast'",
        ),
        (
            {"template": {"spec": {"containers": [CONTAINER], "restartPolicy": "Sometimes"}}},
            "spec.jobTargetRef.template.spec.restartPolicy",
            "must be one of Always, Never, OnFailure",
        ),
        (
            {**pod(), "backofLimit": 2},
            "spec.jobTargetRef.backofLimit",
            "unknown field; did you mean 'backoffLimit'?",
        ),
        (
            pod(comand=["x"]),
            "spec.jobTargetRef.template.spec.containers[0].comand",
            "unknown field; did you mean 'command'?",
        ),
        (
            {"templat": {"spec": {"containers": [CONTAINER]}}},
            "spec.jobTargetRef.templat",
            "unknown field; did you mean 'template'?",
        ),
        (
            {**pod(), "maxReplicaCount": 5},
            "spec.jobTargetRef.maxReplicaCount",
            "it is a ScaledJob field; move it out of the Job template",
        ),
        (
            pod(env=[{"name": "A", "value": "{{ message.json.a }}", "valueForm": {}}]),
            "spec.jobTargetRef.template.spec.containers[0].env[0].valueForm",
            "did you mean 'valueFrom'?",
        ),
        (
            {"template": {"spec": {"containers": [{"image": "x"}]}}},
            "spec.jobTargetRef.template.spec.containers[0].name",
            "required",
        ),
        (
            pod(args=["{{ mesage.json.x }}"]),
            "spec.jobTargetRef.template.spec.containers[0].args[0]",
            "unknown name 'mesage' in the template; did you mean 'message'?",
        ),
    ],
)
def test_template_mistakes_are_refused_at_start_naming_file_line_and_field(
    tmp_path: Path, job_spec: Any, field: str, says: str
) -> None:
    text = refused(tmp_path, job_spec)
    assert f"field {field}: " in text, text
    assert says in text, text
    assert "scaledjob.yaml: line " in text, text


def test_the_line_given_is_the_line_of_the_mistake(tmp_path: Path) -> None:
    path = write(tmp_path, {**pod(), "backoffLimit": "two"})
    wanted = next(
        n for n, line in enumerate(path.read_text().splitlines(), 1) if "backoffLimit" in line
    )
    text = refused(tmp_path, {**pod(), "backoffLimit": "two"})
    assert f"line {wanted}, field spec.jobTargetRef.backoffLimit" in text


def test_a_template_file_names_its_own_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(
        "apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    spec:\n"
        "      containers:\n      - name: work\n        image: busybox\n"
        "        comand: [x]\n"
    )
    doc = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize"},
        "spec": {
            "jobTemplate": "job.yaml",
            "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
        },
    }
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    (elsewhere / "job.yaml").write_text((tmp_path / "job.yaml").read_text())
    path = elsewhere / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    scaledjob = load_manifest(path).scaledjobs[0]
    with pytest.raises(ManifestError) as err:
        Renderer(scaledjob, base_dirs=template_dirs(path))
    text = str(err.value)
    # Found beside the manifest (not in the working directory), and named with its line.
    assert (
        f"{elsewhere / 'job.yaml'}: line 9, field spec.template.spec.containers[0].comand" in text
    )


def test_a_jinja_syntax_error_names_the_field(tmp_path: Path) -> None:
    text = refused(tmp_path, pod(args=["{{ message.json.x }"]))
    assert "field spec.jobTargetRef.template.spec.containers[0].args[0]" in text
    assert "template syntax error" in text


def delivery(body: bytes) -> Delivery:
    return Delivery(source="sqlite", identity="m-1", body=body, message_id="m-1")


def rendered(job_spec: dict[str, Any], body: bytes) -> dict[str, Any]:
    manifest = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize"},
        "spec": {
            "jobTargetRef": job_spec,
            "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
        },
    }
    return Renderer(parse_scaledjob(manifest)).render(delivery(body)).job


@pytest.mark.parametrize(
    ("key", "template", "value", "expected"),
    [
        ("activeDeadlineSeconds", "{{ message.json.v }}", 60, 60),
        ("activeDeadlineSeconds", "{{ message.json.v }}", "60", 60),
        ("backoffLimit", "{{ message.json.v + 1 }}", 2, 3),
        ("suspend", "{{ message.json.v }}", True, True),
        ("suspend", "{{ message.json.v | lower }}", "FALSE", False),
        ("completions", "{{ message.json.v }}", " 3 ", 3),
    ],
)
def test_a_rendered_value_lands_in_the_type_of_its_field(
    key: str, template: str, value: Any, expected: Any
) -> None:
    job = rendered({**pod(), key: template}, json.dumps({"v": value}).encode())
    assert job["spec"][key] == expected
    assert type(job["spec"][key]) is type(expected)


def test_quantities_and_int_or_strings_land_as_the_api_server_reads_them() -> None:
    job = rendered(
        pod(
            resources={"limits": {"cpu": "{{ message.json.cpu }}", "memory": 1024}},
            ports=[{"containerPort": "{{ message.json.port }}"}],
            livenessProbe={"httpGet": {"port": "{{ message.json.port }}"}},
            startupProbe={"httpGet": {"port": "http"}},
        ),
        b'{"cpu": "500m", "port": "8080"}',
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": 1024}
    assert container["ports"][0]["containerPort"] == 8080
    assert container["livenessProbe"]["httpGet"]["port"] == 8080
    assert container["startupProbe"]["httpGet"]["port"] == "http"


@pytest.mark.parametrize(
    ("job_spec", "body", "field", "says"),
    [
        (
            {**pod(), "activeDeadlineSeconds": "{{ message.json.timeout }}"},
            b'{"timeout": "1m"}',
            "spec.jobTargetRef.activeDeadlineSeconds",
            "expected an integer, got the string '1m'",
        ),
        (
            {
                "template": {
                    "spec": {"containers": [CONTAINER], "restartPolicy": "{{ message.json.p }}"}
                }
            },
            b'{"p": "Sometimes"}',
            "spec.jobTargetRef.template.spec.restartPolicy",
            "must be one of Always, Never, OnFailure",
        ),
        (
            pod(resources={"limits": {"memory": "{{ message.json.m }}"}}),
            b'{"m": "1 GB"}',
            "spec.jobTargetRef.template.spec.containers[0].resources.limits.memory",
            "expected a quantity",
        ),
        (
            {**pod(), "suspend": "{{ message.json.s }}"},
            b'{"s": "maybe"}',
            "spec.jobTargetRef.suspend",
            "expected true or false",
        ),
    ],
)
def test_a_rendered_value_that_cannot_land_is_a_template_error_naming_the_field(
    job_spec: dict[str, Any], body: bytes, field: str, says: str
) -> None:
    with pytest.raises(RenderError) as err:
        rendered(job_spec, body)
    assert err.value.reason == "TemplateError"
    assert f"field {field}: " in err.value.detail
    assert says in err.value.detail


def test_a_message_made_label_value_the_api_server_would_refuse_is_a_template_error() -> None:
    spec = {
        "template": {
            "metadata": {"labels": {"tenant": "{{ message.json.t }}"}},
            **pod()["template"],
        }
    }
    with pytest.raises(RenderError) as err:
        rendered(spec, b'{"t": "not a label value!"}')
    assert err.value.reason == "TemplateError"
    assert "spec.jobTargetRef.template.metadata.labels.tenant" in err.value.detail
    assert (
        rendered(spec, b'{"t": "acme-1"}')["spec"]["template"]["metadata"]["labels"]["tenant"]
        == "acme-1"
    )


def test_a_nul_byte_from_a_message_is_refused_before_any_job() -> None:
    spec = pod(env=[{"name": "NOTE", "value": "{{ message.json.note }}"}])
    with pytest.raises(RenderError) as err:
        rendered(spec, json.dumps({"note": "a\u0000b"}).encode())
    assert err.value.reason == "InvalidMessage"
    assert "containers[0].env[0].value" in err.value.detail
    assert "NUL" in err.value.detail


def sqlite_manifest(job_spec: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize"},
        "spec": {
            "jobTargetRef": job_spec,
            "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
            **spec,
        },
    }


@pytest.mark.parametrize("mode", ["env", "args", "auto"])
def test_an_env_limit_no_process_can_take_is_refused_by_validate(mode: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_scaledjob(
            sqlite_manifest(pod(), messageDelivery={"mode": mode, "maxEnvBytes": 262144})
        )
    text = str(err.value)
    assert "field spec.messageDelivery.maxEnvBytes" in text
    assert "MAX_ARG_STRLEN" in text


def test_a_message_size_limit_above_what_a_secret_holds_is_refused() -> None:
    with pytest.raises(ManifestError) as err:
        parse_scaledjob(sqlite_manifest(pod(), messageDelivery={"maxMessageBytes": 1048576}))
    assert "field spec.messageDelivery.maxMessageBytes" in str(err.value)


def render_with(body: bytes, headers: dict[str, str] | None = None, **delivery: Any) -> Any:
    scaledjob = parse_scaledjob(sqlite_manifest(pod(), messageDelivery=delivery))
    return Renderer(scaledjob).render(
        Delivery(source="sqlite", identity="m", body=body, message_id="m", headers=headers or {})
    )


def secret_size(secret: dict[str, Any]) -> int:
    import base64

    return sum(len(base64.b64decode(v)) for v in secret["data"].values())


@pytest.mark.parametrize(
    "body",
    [b"x" * (512 * 1024), bytes(range(256)) * 2048, b"$" * (512 * 1024)],
    ids=["text", "binary", "dollars"],
)
def test_the_default_limits_fit_every_body_they_admit(body: bytes) -> None:
    # The largest body the defaults admit makes a Secret within 1 MiB and a Job and
    # annotations within their limits (the real API server takes it: see
    # tests/integration/test_platform_limits.py).
    out = render_with(body)
    assert out.secret is not None
    assert secret_size(out.secret) <= 1024 * 1024
    assert len(json.dumps(out.job)) < 1536 * 1024


def test_a_body_in_env_mode_that_cannot_be_passed_is_too_large_not_a_failed_job() -> None:
    # Fits maxEnvBytes as a body, but as base64 it is over what Linux passes.
    body = bytes(range(256)) * 400  # 102400 bytes, 136536 as base64
    with pytest.raises(RenderError) as err:
        render_with(body, mode="env", maxEnvBytes=120_000)
    assert err.value.reason == "MessageTooLarge"
    # In auto mode the same body goes to a file instead.
    out = render_with(body, mode="auto", maxEnvBytes=120_000)
    assert out.secret is not None


def test_headers_that_would_overflow_the_secret_are_too_large() -> None:
    headers = {f"h{i}": "v" * 1000 for i in range(300)}
    with pytest.raises(RenderError) as err:
        render_with(b"x" * (500 * 1024), headers=headers)
    assert err.value.reason == "MessageTooLarge"
    assert "1 MiB" in err.value.detail


def _custom_resource(job_template: str) -> Any:
    """A ScaledJob as the operator gets it from the API server (no file behind it)."""
    return parse_scaledjob(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "probe", "namespace": "team"},
            "spec": {
                "jobTemplate": job_template,
                "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
            },
        }
    )


JOB_FILE = "template:\n  spec:\n    containers: [{name: w, image: busybox}]\n"


@pytest.mark.parametrize("name", ["/etc/passwd", "~/secret.yaml", "../x.yaml", "a/../../x.yaml"])
def test_a_custom_resource_may_not_name_a_file_outside_the_template_directories(
    tmp_path: Path, name: str
) -> None:
    templates = tmp_path / "job_templates"
    templates.mkdir()
    (tmp_path / "x.yaml").write_text("password: hunter2\n")  # what a probe would reveal
    with pytest.raises(ManifestError) as err:
        Renderer(_custom_resource(name), base_dirs=[templates])
    text = str(err.value)
    assert f"field spec.jobTemplate: {name!r} is outside the operator's template" in text
    assert "password" not in text
    assert "not found" not in text


def test_a_symlink_out_of_the_template_directory_is_not_followed(tmp_path: Path) -> None:
    templates = tmp_path / "job_templates"
    templates.mkdir()
    (tmp_path / "secret.yaml").write_text("password: hunter2\n")
    (templates / "link.yaml").symlink_to(tmp_path / "secret.yaml")
    with pytest.raises(ManifestError) as err:
        Renderer(_custom_resource("link.yaml"), base_dirs=[templates])
    assert "file not found: link.yaml" in str(err.value)
    assert "password" not in str(err.value)


def test_a_custom_resource_names_a_template_inside_the_directories_and_a_file_any(
    tmp_path: Path,
) -> None:
    templates = tmp_path / "job_templates"
    (templates / "team").mkdir(parents=True)
    (templates / "team" / "job.yaml").write_text(JOB_FILE)
    assert Renderer(_custom_resource("team/job.yaml"), base_dirs=[templates]).template
    # A manifest file's author owns the filesystem: an absolute path is theirs to give.
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(JOB_FILE)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledJob",
                "metadata": {"name": "own"},
                "spec": {
                    "jobTemplate": str(elsewhere),
                    "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
                },
            }
        )
    )
    scaledjob = load_manifest(manifest).scaledjobs[0]
    assert Renderer(scaledjob, base_dirs=template_dirs(manifest)).template


def test_a_template_file_reached_through_dotdot_is_named_by_its_own_path(
    tmp_path: Path,
) -> None:
    """The walk found ``deploy/examples/../../job_templates/echo-job.yaml: line 25`` in an
    error: a template file is named as the file it is."""
    (tmp_path / "job_templates").mkdir()
    bad = {"spec": {"backoffLimit": "two", **pod()}}
    (tmp_path / "job_templates" / "t.yaml").write_text(yaml.safe_dump(bad))
    manifests = tmp_path / "deploy" / "examples"
    manifests.mkdir(parents=True)
    doc = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize"},
        "spec": {
            "jobTemplate": "../../job_templates/t.yaml",
            "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
        },
    }
    path = manifests / "scaledjob.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as err:
        Renderer(load_manifest(path).scaledjobs[0], base_dirs=template_dirs(path))
    assert str(tmp_path.resolve() / "job_templates" / "t.yaml") in str(err.value)
    assert ".." not in str(err.value)
