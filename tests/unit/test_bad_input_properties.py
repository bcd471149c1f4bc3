"""Bad input, systematically (hypothesis): any message through real templates keeps the
Job's structure and reaches the process byte-exact; any field of a manifest made wrong
gives an error naming that field, never a traceback."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobrunner.core.models import Delivery
from jobrunner.core.naming import message_identity
from jobrunner.local.supervisor import expand
from jobrunner.manifest.loader import load_manifest, parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.rendering.renderer import Renderer, RenderError

TEMPLATE = {
    "backoffLimit": 0,
    "template": {
        "metadata": {"annotations": {"note": "{{ message.id }}"}},
        "spec": {
            "containers": [
                {
                    "name": "work",
                    "image": "busybox",
                    "command": ["sh", "-c", "run"],
                    "args": ["--body={{ message.body }}", "--id={{ message.id }}"],
                    "env": [
                        {"name": "HEADERS", "value": "{{ message.headers | tojson }}"},
                        {"name": "SECRET", "value": "s3cr3t"},
                    ],
                }
            ]
        },
    },
}

SCALEDJOB = {
    "apiVersion": "jobrunner.dev/v1alpha1",
    "kind": "ScaledJob",
    "metadata": {"name": "props", "namespace": "default"},
    "spec": {
        "jobTargetRef": TEMPLATE,
        "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
        "messageDelivery": {"maxEnvBytes": 4096},
    },
}
RENDERER = Renderer(parse_scaledjob(copy.deepcopy(SCALEDJOB)))

header_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
texts = st.text(max_size=300)


def shape(value: Any) -> Any:
    """The structure of a value: keys and lengths, not scalars."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


EXPECTED = None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(st.binary(max_size=6000), texts.map(str.encode)),
    headers=st.dictionaries(header_names, texts, max_size=5),
    message_id=st.one_of(st.none(), texts.filter(bool)),
)
def test_any_message_keeps_the_jobs_structure_and_arrives_byte_exact(
    body: bytes, headers: dict[str, str], message_id: str | None
) -> None:
    global EXPECTED
    delivery = Delivery(
        source="sqlite",
        identity=message_identity(message_id, body, headers),
        body=body,
        message_id=message_id,
        headers=headers,
    )
    # The template places the body and the id raw (headers travel as JSON, which escapes
    # a NUL): only a NUL there, which no process can carry, may be refused.
    if "\x00" in body.decode("utf-8", errors="replace") + (message_id or ""):
        with pytest.raises(RenderError) as refused:
            RENDERER.render(delivery)
        assert refused.value.reason == "InvalidMessage"
        assert "NUL" in refused.value.detail
        return
    rendered = RENDERER.render(delivery)
    job = rendered.job
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    defined = {"SECRET": "s3cr3t"}
    # The kubelet's expansion gives back exactly the message's text, never a variable.
    assert expand(container["args"][0], defined) == "--body=" + body.decode(
        "utf-8", errors="replace"
    )
    assert expand(container["args"][1], defined) == f"--id={message_id}"
    assert json.loads(expand(env["HEADERS"], defined)) == headers
    assert expand(env["JOBRUNNER_MESSAGE_ID"], {}) == (message_id or delivery.identity)
    if "JOBRUNNER_MESSAGE" in env:
        value = expand(env["JOBRUNNER_MESSAGE"], {})
        if env["JOBRUNNER_MESSAGE_ENCODING"] == "base64":
            assert base64.b64decode(value) == body
        else:
            assert value.encode() == body
    else:
        assert rendered.secret is not None
        assert base64.b64decode(rendered.secret["data"]["body"]) == body
    # The structure never changes with the message (only values and the delivery mode).
    structure = shape(
        {
            "spec_keys": sorted(job["spec"]),
            "args": container["args"],
            "command": container["command"],
            "containers": len(job["spec"]["template"]["spec"]["containers"]),
            "metadata_keys": sorted(job["metadata"]),
        }
    )
    if EXPECTED is None:
        EXPECTED = structure
    assert structure == EXPECTED


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field path of a document, containers included."""
    out = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += leaves(item, (*path, i))
    return out


FIELDS = [p for p in leaves(SCALEDJOB) if p[0] != "kind"]
WRONG = st.one_of(
    st.just({"unexpected": {"nested": [1, 2]}}),
    st.just([["a"], {"b": 1}]),
    st.just(-7),
    st.just("1m"),
    st.just(True),
    st.just(None),
)


def set_at(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(FIELDS), wrong=WRONG)
def test_any_field_made_wrong_is_named_in_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, field: tuple[Any, ...], wrong: Any
) -> None:
    doc = copy.deepcopy(SCALEDJOB)
    set_at(doc, field, wrong)
    path = Path(tmp_path_factory.mktemp("m")) / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        manifests = load_manifest(path)
        Renderer(manifests.scaledjobs[0])
    except ManifestError as exc:
        text = str(exc)
        # The field, or the part of it that is wrong, is named.
        prefix = dotted(field[:2]) if field[:2] == ("spec", "jobTargetRef") else dotted(field[:1])
        assert prefix in text or dotted(field) in text, text
        assert "Traceback" not in text
        return
    # Accepted: the wrong value must have been a valid one for that field after all
    # (null for an optional field, a string where a string goes, ...), and the
    # ScaledJob still renders a message or refuses it with a reason.
    reason = ""
    try:
        Renderer(parse_scaledjob(doc)).render(
            Delivery(source="sqlite", identity="m", body=b"{}", message_id="m")
        )
    except RenderError as exc:
        reason = exc.reason
    assert reason in ("", "TemplateError", "InvalidMessage", "MessageTooLarge")
