"""The chart's tenant settings: off by default, passed to the operator in the form its
settings read, and names that are not variable names refused by the schema."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from jobrunner.core.settings import Settings
from tests.helm import CHART, helm


def operator_env(*sets: str) -> dict[str, str]:
    args = ["template", "rel", str(CHART), "-n", "jr-system"]
    for item in sets:
        args += ["--set", item]
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"] if "value" in e}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        if name.startswith("JOBRUNNER_OPERATOR__"):
            monkeypatch.setenv(name, value)
    return Settings()


def test_by_default_tenants_read_no_variable_and_use_no_operator_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = operator_env()
    assert env["JOBRUNNER_OPERATOR__TENANT_ENV_ALLOW_LIST"] == ""
    assert env["JOBRUNNER_OPERATOR__ALLOW_OPERATOR_IDENTITY"] == "false"
    op = settings_from(env, monkeypatch).operator
    assert op.tenant_env_names() == []
    assert op.allow_operator_identity is False


def test_the_owners_choices_reach_the_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = operator_env("tenantEnvAllowList={SHARED_MQ,AWS_REGION}", "allowOperatorIdentity=true")
    op = settings_from(env, monkeypatch).operator
    assert op.tenant_env_names() == ["SHARED_MQ", "AWS_REGION"]
    assert op.allow_operator_identity is True


def test_schema_refuses_an_allow_list_entry_that_is_not_a_variable_name() -> None:
    result = helm("lint", "--strict", str(CHART), "--set", "tenantEnvAllowList={A-B}", check=False)
    assert result.returncode != 0
    assert "tenantEnvAllowList" in result.stdout + result.stderr
