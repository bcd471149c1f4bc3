"""What the differential test (tests/integration/test_local_vs_kubelet.py) found the local
executor doing otherwise than the kubelet, fixed or said: exit codes of processes a signal
ended, exec probes run as the kubelet runs them, and a warning for a mount path inside a
script."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jobrunner.local import compat
from jobrunner.local.supervisor import Process, _exit_code

ROOT = Path(__file__).resolve().parents[2]


def test_a_process_a_signal_ended_has_the_exit_code_a_container_runtime_reports() -> None:
    # Python's returncode is minus the signal; a podFailurePolicy rule on 137 must match.
    assert _exit_code(-9) == 137
    assert _exit_code(-15) == 143
    assert _exit_code(3) == 3
    assert _exit_code(0) == 0
    assert _exit_code(None) == 137


def test_an_exec_probe_command_is_expanded_and_its_mount_paths_mapped(tmp_path: Path) -> None:
    proc = Process(
        container="sidecar",
        argv=["sh"],
        env={},
        cwd=tmp_path,
        log=tmp_path / "log",
        mounts=(("/shared", tmp_path / "shared"),),
        defined={"NAME": "up"},
    )
    assert proc.probe_argv(["cat", "/shared/$(NAME)", "$$(NAME)", "$(UNSET)"]) == [
        "cat",
        f"{tmp_path}/shared/up",
        "$(NAME)",
        "$(UNSET)",
    ]


def _spec(container: dict[str, Any]) -> dict[str, Any]:
    return {
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [
                    {
                        "name": "main",
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        **container,
                    }
                ],
            }
        }
    }


def test_a_mount_path_inside_a_script_is_warned_about_naming_the_item() -> None:
    warnings = compat.spec_warnings(_spec({"command": ["sh", "-c", "cat /data/x"]}))
    assert [w.field("spec") for w in warnings] == ["spec.template.spec.containers[0].command[2]"]
    assert "this machine's /data, not the volume" in warnings[0].text
    assert warnings[0].text.startswith(compat.EXECUTOR)


def test_a_mount_path_as_a_whole_item_or_through_env_is_not_warned_about() -> None:
    assert compat.spec_warnings(_spec({"command": ["cat", "/data/x"]})) == []
    assert compat.spec_warnings(_spec({"command": ["sh", "-c", 'cat "$DATA/x"']})) == []


def test_every_difference_from_the_kubelet_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Where the local executor and the kubelet differ", 1)[1][:6000]
    for key in compat.KUBELET_DIFFERENCES:
        assert re.search(rf"\| {re.escape(key)} \|", section), key
