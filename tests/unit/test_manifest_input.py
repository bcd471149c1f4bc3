"""Every file jobrunner reads refuses a key given twice, naming both lines (YAML and
PyYAML's JSON both keep the last one silently), and a file of the wrong kinds says what
it holds (issue 21, section 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.functions.importer import read_app
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.rendering.renderer import Renderer

SCALEDJOB = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: t
spec:
  maxReplicaCount: 2
{extra}  triggers:
  - type: sqlite
    metadata: {{queueName: t}}
  jobTargetRef:
    template:
      spec:
        containers:
        - name: w
          image: busybox
          command: [echo]
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        (SCALEDJOB.format(extra="  maxReplicaCount: 3\n"), "maxReplicaCount", 7, 6),
        (
            SCALEDJOB.replace("image: busybox\n", "image: busybox\n          image: alpine\n"),
            "image",
            16,
            15,
        ),
        (SCALEDJOB.replace("{queueName: t}", "{queueName: t, queueName: u}"), "queueName", 9, 9),
        (
            SCALEDJOB.format(extra="")
            + "---\napiVersion: keda.sh/v1alpha1\nkind: TriggerAuthentication\n"
            "metadata: {name: a}\nspec:\n  secretTargetRef: []\n  secretTargetRef: []\n",
            "secretTargetRef",
            23,
            22,
        ),
        (
            SCALEDJOB.format(extra="").replace("kind: ScaledJob\n", "kind: ScaledJob\nkind: X\n"),
            "kind",
            3,
            2,
        ),
    ],
)
def test_a_duplicate_key_in_a_manifest_is_refused_with_both_lines(
    tmp_path: Path, text: str, key: str, line: int, first: int
) -> None:
    if "{extra}" in text:
        text = text.format(extra="")
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert f"{path}: line {line}," in message
    assert f"duplicate key {key!r}" in message
    assert f"at line {first})" in message
    assert "keep one" in message


def test_a_duplicate_key_in_a_job_template_file_is_refused_with_both_lines(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "template:\n  spec:\n    containers:\n    - name: w\n      image: busybox\n"
        "      command: [echo]\n    restartPolicy: Never\n    restartPolicy: OnFailure\n",
        "job.yaml",
    )
    manifest = write(
        tmp_path,
        SCALEDJOB.format(extra="").split("  jobTargetRef:")[0] + "  jobTemplate: job.yaml\n",
    )
    scaledjob = load_manifest(manifest).scaledjobs[0]
    with pytest.raises(ManifestError) as caught:
        Renderer(scaledjob, base_dirs=[tmp_path])
    assert "job.yaml: line 8," in str(caught.value)
    assert "duplicate key 'restartPolicy'" in str(caught.value)
    assert "at line 7)" in str(caught.value)


def test_a_key_that_overrides_a_yaml_merge_is_not_a_duplicate(tmp_path: Path) -> None:
    text = SCALEDJOB.format(extra="").replace(
        "metadata: {queueName: t}",
        "metadata:\n      <<: {queueName: x}\n      queueName: t",
    )
    scaledjob = load_manifest(write(tmp_path, text)).scaledjobs[0]
    assert scaledjob.spec.triggers[0].metadata["queueName"] == "t"


@pytest.mark.parametrize(
    ("name", "text", "line", "first"),
    [
        ("host.json", '{\n  "version": "2.0",\n  "version": "3.0"\n}\n', 3, 2),
        (
            "local.settings.json",
            '{"Values": {\n  "A": "1",\n  "B": {"A": 1},\n  "A": "2"\n}}\n',
            4,
            2,
        ),
        (
            "Hello/function.json",
            '{"bindings": [\n {"type": "queueTrigger",\n  "name": "m",\n  "name": "n"}\n]}\n',
            4,
            3,
        ),
    ],
)
def test_a_duplicate_key_in_a_function_apps_json_is_refused_with_both_lines(
    tmp_path: Path, name: str, text: str, line: int, first: int
) -> None:
    files = {
        "host.json": '{"version": "2.0"}',
        "Hello/function.json": '{"bindings": [{"type": "queueTrigger", "name": "m"}]}',
        name: text,
    }
    for file, content in files.items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(content)
    with pytest.raises(ManifestError) as caught:
        read_app(tmp_path)
    message = str(caught.value)
    assert f"{name}: line {line}: duplicate key" in message, message
    assert f"(the first at line {first})" in message


DEPLOYMENT = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
SCALEDOBJECT = (
    "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: web-scaler}\n"
    "spec: {scaleTargetRef: {name: web}}\n"
)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (DEPLOYMENT, ["holds Deployment web (line 1)", "jobrunner runs ScaledJobs", "add one"]),
        (
            DEPLOYMENT + "---\n" + SCALEDOBJECT,
            [
                "holds Deployment web (line 1), ScaledObject web-scaler (line 5)",
                "KEDA's scaler for a Deployment",
                "jobrunner runs ScaledJobs",
                "jobTargetRef in place of scaleTargetRef",
            ],
        ),
        (
            SCALEDJOB.format(extra="").replace("kind: ScaledJob", "kind: Scaledjob"),
            ["holds Scaledjob t (line 1)", "kind: Scaledjob is not kind: ScaledJob"],
        ),
        ("apiVersion: v1\nkind: List\nitems: []\n", ["holds List ?", "its own document"]),
        ("# only a comment\n", ["holds no YAML document"]),
    ],
)
def test_a_file_without_a_scaledjob_names_what_it_holds(
    tmp_path: Path, text: str, says: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: no ScaledJob in this file")
    for part in says:
        assert part in message, message
