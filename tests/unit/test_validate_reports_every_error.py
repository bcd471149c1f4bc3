"""`jobrunner validate` (and every command that loads a manifest) reports every
independent mistake of a file at once, each with its line: the fields of each document,
its triggers, and the templates of the ScaledJobs whose fields are right — a template
error is never hidden behind a trigger error, nor one document's behind another's."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.cli import main

FILE = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: work
spec:
  jobTargetRef:
    template:
      spec:
        containers:
          - name: work
            image: busybox
            command: ["echo", "{{ message.json.x }"]
  triggers:
    - type: rabbitmq
      metadata:
        queueNme: q
        host: amqp://localhost
---
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: second
spec:
  maxReplicaCount: 0
  jobTargetRef:
    template:
      spec:
        containers:
          - name: w
            image: busybox
            command: ["true"]
  triggers:
    - type: rabbitmq
      metadata:
        queueName: q
        host: amqp://localhost
---
apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata:
  name: broker
spec:
  secretTargetRef:
    - parameter: host
      key: url
---
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: third
spec:
  jobTargetRef:
    template:
      spec:
        containers:
          - name: w
            image: busybox
            command: ["{{ message.json.y "]
  triggers:
    - type: rabbitmq
      metadata:
        queueName: q
        host: amqp://localhost
"""


def line(text: str, nth: int = 1) -> int:
    """The line of FILE holding ``text`` (its ``nth`` occurrence)."""
    found = [i for i, row in enumerate(FILE.splitlines(), 1) if text in row]
    return found[nth - 1]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_every_independent_mistake_of_a_file_is_reported_at_once_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(FILE)
    local = ["--local", "--state-dir", str(tmp_path / "s")] if command == "run" else []
    code = main([command, "-f", str(path), *local])
    err = capsys.readouterr().err
    assert code == 2, err
    command_0 = "spec.jobTargetRef.template.spec.containers[0].command"
    expected = [
        # document 1: its trigger...
        f"line {line('queueNme')}, field spec.triggers[0].metadata.queueNme: unknown rabbitmq "
        "trigger metadata key; did you mean 'queueName'?",
        # document 2: its fields
        f"line {line('maxReplicaCount')}, field spec.maxReplicaCount: Input should be greater "
        "than or equal to 1",
        # document 3: a TriggerAuthentication's
        "(document 3, TriggerAuthentication)",
        "secretTargetRef[0].name",
    ]
    if command == "validate":
        expected += [
            # ...and document 1's template, behind its trigger error
            f"line {line('message.json.x')}, field {command_0}[1]: template syntax error",
            # document 4: only its template is wrong
            f"line {line('message.json.y')}, field {command_0}[0]: template syntax error",
        ]
    missing = [text for text in expected if text not in err]
    assert missing == [], err
    starts = [row for row in err.splitlines() if row.startswith("error:")]
    assert len(starts) == 1, "one error, listing every mistake"


def test_a_file_whose_only_mistakes_are_templates_gets_them_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(FILE.replace("queueNme", "queueName").replace("maxReplicaCount: 0", ""))
    path.write_text("---\n".join(d for d in path.read_text().split("---\n") if "Trigger" not in d))
    code = main(["validate", "-f", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "containers[0].command[1]: template syntax error" in err
    assert "containers[0].command[0]: template syntax error" in err


FOUR = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: work
spec:
  maxReplicaCont: 4
  triggers:
    - type: sqlite
      metadata:
        queueName: work
        queueNme: work
  jobTargetRef:
    template:
      spec:
        containers:
          - nme: work
            image: busybox
            env:
              - name: IMAGE
                value: "{{ mesage.json.image }}"
            command: ["echo", "{{ massage.id }}"]
"""


def test_a_field_error_hides_neither_the_triggers_nor_the_templates_mistakes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ScaledJob field, a trigger key, a container field and two template names, all
    wrong: one error naming the five (i21, F8: the field error alone was reported)."""
    path = tmp_path / "m.yaml"
    path.write_text(FOUR)
    code = main(["validate", "-f", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err

    def at(text: str) -> int:
        return next(i for i, row in enumerate(FOUR.splitlines(), 1) if text in row)

    containers = "spec.jobTargetRef.template.spec.containers[0]"
    expected = [
        f"line {at('maxReplicaCont')}, field spec.maxReplicaCont: unknown field; did you mean "
        "'maxReplicaCount'?",
        f"line {at('queueNme')}, field spec.triggers[0].metadata.queueNme: unknown sqlite "
        "trigger metadata key; did you mean 'queueName'?",
        f"line {at('nme: work')}, field {containers}.nme: unknown field; did you mean 'name'?",
        f"line {at('mesage')}, field {containers}.env[0].value: unknown name 'mesage'",
        f"line {at('massage')}, field {containers}.command[1]: unknown name 'massage'",
    ]
    assert [text for text in expected if text not in err] == [], err
    assert len([row for row in err.splitlines() if row.startswith("error:")]) == 1, err


def test_every_unknown_name_of_a_job_template_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(FOUR.replace("maxReplicaCont", "maxReplicaCount").replace("nme:", "name:"))
    path.write_text(path.read_text().replace("        queueNme: work\n", ""))
    code = main(["validate", "-f", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "invalid templated strings in the Job template" in err
    assert "unknown name 'mesage'" in err
    assert "unknown name 'massage'" in err
