"""Every name that becomes part of an API path (or a local Job's directory) is the
Kubernetes name it must be: the models refuse anything else naming the field, the CRDs
carry the same rule, and the one function that makes a name a path segment refuses it
again, so a name can never reach another object (issue #20, item 1: a TriggerAuthentication
whose Secret name was ``../../kube-system/secrets/admin`` read that Secret)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from jobrunner.cli import main
from jobrunner.core import apipath, limits
from jobrunner.core.apipath import InvalidName
from jobrunner.core.protocols import ApiRejected
from jobrunner.kube.client import KubeJobClient
from jobrunner.kube.objects import KubeObjects
from jobrunner.local.client import LocalJobClient
from jobrunner.manifest.loader import parse_scaledjob, parse_trigger_authentication
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.operator import api
from jobrunner.operator.crd import scaledjob_crd, trigger_authentication_crd
from jobrunner.operator.resources import wanted_from
from jobrunner.testing import MemoryObjects
from tests.unit.test_operator import NS, Env, until
from tests.unit.test_operator_registry import scaledjob_object

BAD_NAMES = [
    "..",
    ".",
    "../../kube-system/secrets/admin",
    "x/../../../kube-system/secrets/admin",
    "kube-system/secrets/admin",
    "a/b",
    "..%2F..%2Fkube-system%2Fsecrets%2Fadmin",
    "a%2Fb",
    "%2e%2e",
    "%2E%2E",
    "Admin",
    "ADMIN",
    "a" * 254,
    "",
    "-admin",
    "admin-",
    ".admin",
    "admin.",
    "a..b",
    "a b",
    "admin\x00",
    "admin\n",  # a regular expression's `$` matches before a final newline
    "admin?x=1",
    "admin#x",
    "a\\b",
    "\uff41dmin",  # FULLWIDTH LATIN SMALL LETTER A
    "\u0430dmin",  # CYRILLIC SMALL LETTER A
    "adm\u0131n",  # LATIN SMALL LETTER DOTLESS I
    "admin\u200b",  # ZERO WIDTH SPACE
]
"""None of these is a DNS-1123 subdomain: each is refused wherever a name is taken."""

GOOD_NAMES = ["admin", "broker-auth", "rabbitmq.auth", "a", "0", "a" * 253, "a-b.c-d.e"]


def _ids(names: list[str]) -> list[str]:
    return [ascii(n)[:40] for n in names]


# ---------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("name", BAD_NAMES, ids=_ids(BAD_NAMES))
def test_no_bad_name_is_a_dns1123_subdomain_by_any_of_the_three_checks(name: str) -> None:
    assert limits.dns1123_subdomain_problem(name) is not None
    # The same pattern as the CRD and pydantic apply it (whole string, no final newline).
    assert re.fullmatch(limits.DNS1123_SUBDOMAIN_PATTERN, name) is None or len(name) > 253
    with pytest.raises(InvalidName):
        apipath.name(name, field="Secret name")


@pytest.mark.parametrize("name", GOOD_NAMES, ids=_ids(GOOD_NAMES))
def test_valid_names_pass_unchanged(name: str) -> None:
    assert limits.dns1123_subdomain_problem(name) is None
    assert apipath.name(name, field="Secret name") == name


def test_a_namespace_is_a_label_no_dots_and_at_most_63() -> None:
    assert apipath.namespace("media") == "media"
    for bad in ("kube.system", "n" * 64, "..", "a/b", "", "Media"):
        with pytest.raises(InvalidName, match=r"DNS-1123 label|at most 63"):
            apipath.namespace(bad)


def test_the_refusal_is_a_422_naming_the_field_and_the_rule() -> None:
    with pytest.raises(InvalidName) as refused:
        apipath.name("../../kube-system/secrets/admin", field="Secret name")
    assert isinstance(refused.value, ApiRejected)
    assert (refused.value.status, refused.value.reason) == (422, "Invalid")
    assert refused.value.field == "Secret name"
    text = str(refused.value)
    assert "Secret name" in text
    assert "DNS-1123 subdomain" in text
    assert "'../../kube-" in text
    with pytest.raises(InvalidName, match="at most 253 characters, got 254"):
        apipath.name("a" * 254, field="Secret name")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/a/secrets/../../kube-system/secrets/admin",
        "/api/v1/namespaces/a/secrets/./x",
        "/api/v1/namespaces/a/secrets/x/..",
        "/api/v1/namespaces/a/secrets/..%2F..%2Fx",
        "/api/v1/namespaces/a/secrets/%2e%2e",
        "/api/v1/namespaces/a/secrets//x",
        "/api/v1/namespaces/a/secrets/x?watch=true",
        "/api/v1/namespaces/a/secrets/x#y",
        "/api/v1/namespaces/a/secrets/\uff41",
        "/api/v1/namespaces/a/secrets/x\x00",
        "api/v1/namespaces/a/secrets/x",
    ],
)
def test_a_path_no_builder_escaped_is_refused_before_it_is_sent(path: str) -> None:
    with pytest.raises(InvalidName, match="refused unsent"):
        apipath.check_path(path)


def test_every_path_the_operator_builds_passes_the_last_check() -> None:
    for keda in (False, True):
        for ns in ("media", None):
            apipath.check_path(api.scaledjobs(ns, keda=keda))
            apipath.check_path(api.trigger_authentications(ns, keda=keda))
    apipath.check_path(api.item(api.scaledjobs("media"), "work", "status", what="ScaledJob"))
    apipath.check_path(api.item(api.leases("ops"), "jobrunner-bucket-3", what="Lease name"))
    apipath.check_path(api.events("media"))
    with pytest.raises(InvalidName, match="ScaledJob name"):
        api.item(api.scaledjobs("media"), "../x", "status", what="ScaledJob name")
    with pytest.raises(InvalidName, match="namespace"):
        api.scaledjobs("../kube-system")


# ---------------------------------------------------------------------- the models
def _authentication(secret_name: str, *, keda: bool = False, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1" if keda else "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "broker", "namespace": NS, **meta},
        "spec": {
            "secretTargetRef": [
                {"parameter": "host", "name": "ok", "key": "host"},
                {"parameter": "queueName", "name": secret_name, "key": "queue"},
            ]
        },
    }


def _with_auth_ref(name: str) -> dict[str, Any]:
    obj = scaledjob_object()
    obj["spec"]["triggers"][0]["authenticationRef"] = {"name": name}
    return obj


@pytest.mark.parametrize("name", BAD_NAMES, ids=_ids(BAD_NAMES))
@pytest.mark.parametrize("keda", [False, True], ids=["jobrunner.dev", "keda.sh"])
def test_a_secret_name_that_is_not_one_is_refused_naming_the_field_and_the_rule(
    name: str, keda: bool
) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_trigger_authentication(_authentication(name, keda=keda), where="m.yaml")
    text = str(refused.value)
    assert "field spec.secretTargetRef[1].name:" in text, text
    assert ("DNS-1123 subdomain" in text) or ("at most 253 characters (got 254)" in text), text


@pytest.mark.parametrize("name", BAD_NAMES, ids=_ids(BAD_NAMES))
def test_an_authentication_ref_name_that_is_not_one_is_refused_naming_the_field(
    name: str,
) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_scaledjob(_with_auth_ref(name), where="m.yaml")
    assert "field spec.triggers[0].authenticationRef.name:" in str(refused.value)


@pytest.mark.parametrize("name", BAD_NAMES, ids=_ids(BAD_NAMES))
def test_a_trigger_authentication_whose_own_name_is_not_one_is_refused(name: str) -> None:
    doc = _authentication("ok")
    doc["metadata"]["name"] = name
    with pytest.raises(ManifestError, match=re.escape("field metadata.name:")):
        parse_trigger_authentication(doc)


def test_an_env_containers_name_is_a_dns1123_label() -> None:
    doc = _authentication("ok")
    doc["spec"] = {"env": [{"parameter": "host", "name": "HOST", "containerName": "../x"}]}
    with pytest.raises(ManifestError, match=r"containerName: it must be .*DNS-1123 label"):
        parse_trigger_authentication(doc)
    doc["spec"]["env"][0]["containerName"] = "main"
    assert parse_trigger_authentication(doc).spec.env[0].containerName == "main"


@pytest.mark.parametrize("name", GOOD_NAMES, ids=_ids(GOOD_NAMES))
def test_names_kubernetes_allows_are_accepted_everywhere(name: str) -> None:
    doc = _authentication(name)
    doc["metadata"]["name"] = name  # a TriggerAuthentication's name is a subdomain too
    assert parse_trigger_authentication(doc).spec.secretTargetRef[1].name == name
    assert parse_scaledjob(_with_auth_ref(name)).spec.triggers[0].authenticationRef


@pytest.mark.parametrize("keda", [False, True], ids=["jobrunner.dev", "keda.sh"])
def test_a_custom_resource_naming_a_bad_secret_is_invalid_with_the_field_and_the_rule(
    keda: bool,
) -> None:
    obj = _with_auth_ref("broker")
    if keda:
        obj["apiVersion"] = "keda.sh/v1alpha1"
    bad = _authentication("../../kube-system/secrets/admin", keda=keda)
    wanted = wanted_from(obj, keda=keda, authentications={"broker": bad})
    assert wanted.scaledjob is None
    assert wanted.authentications == {}
    assert wanted.invalid is not None
    assert "authenticationRef.name: TriggerAuthentication 'broker'" in wanted.invalid
    assert "field spec.secretTargetRef[1].name: it must be" in wanted.invalid
    assert "DNS-1123 subdomain" in wanted.invalid


# ---------------------------------------------------------------------- the CRDs
def _at(schema: dict[str, Any], *path: str) -> dict[str, Any]:
    node = schema
    for key in path:
        node = node["items"] if key == "[]" else node["properties"][key]
    return node


def test_the_crds_carry_the_name_rules_so_the_api_server_refuses_them_too() -> None:
    ta = trigger_authentication_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    sj = scaledjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    subdomain = {"pattern": limits.DNS1123_SUBDOMAIN_PATTERN, "maxLength": 253}
    label = {"pattern": limits.DNS1123_LABEL_PATTERN, "maxLength": 63}
    for node, rule in (
        (_at(ta, "spec", "secretTargetRef", "[]", "name"), subdomain),
        (_at(ta, "spec", "env", "[]", "containerName"), label),
        (_at(sj, "spec", "triggers", "[]", "authenticationRef", "name"), subdomain),
        (_at(sj, "spec", "function", "outputs", "[]", "authenticationRef", "name"), subdomain),
    ):
        assert {k: node.get(k) for k in rule} == rule, node


# ---------------------------------------------------------------------- where paths are built
@pytest.fixture
async def kube() -> AsyncIterator[KubeJobClient]:
    """The real client, pointed at a port nothing listens on: a request that were sent
    would fail as unreachable (TransientError), so InvalidName proves none was."""
    configuration = client.Configuration(host="http://127.0.0.1:9")
    configuration.retries = 0
    jobs = KubeJobClient(client.ApiClient(configuration))
    yield jobs
    await jobs.close()


def _kube_calls(name: str, ns: str = "media") -> list[Callable[[KubeJobClient], Any]]:
    async def first(stream: Any) -> Any:
        async for item in stream:
            return item
        return None

    return [
        lambda k: k.read_secret(ns, name),
        lambda k: k.get_job(ns, name),
        lambda k: k.annotate_job(ns, name, {"a": "b"}),
        lambda k: k.delete_job(ns, name),
        lambda k: k.release_job(ns, name, {"a": "b"}),
        lambda k: k.pod_log(ns, name, "main"),
        lambda k: first(k.follow_pod_log(ns, name, "main")),
        lambda k: KubeObjects(k).get(api.item(api.scaledjobs(ns), name, "status", what="x")),
        lambda k: KubeObjects(k).patch(api.item(api.leases(ns), name, what="Lease name"), {}),
    ]


@pytest.mark.parametrize(
    "name", ["../../kube-system/secrets/admin", "..", "%2e%2e", "a/b", "Admin", "\uff41"]
)
async def test_the_kube_client_refuses_a_bad_name_without_a_request(
    kube: KubeJobClient, name: str
) -> None:
    for call in _kube_calls(name):
        with pytest.raises(InvalidName):
            await call(kube)
    assert kube.requests == {}, "nothing was sent"


@pytest.mark.parametrize("name", ["..", ".", "%2e%2e", "a%2Fb", "\uff41"])
async def test_a_raw_path_with_a_name_no_builder_checked_is_not_sent_either(
    kube: KubeJobClient, name: str
) -> None:
    objects = KubeObjects(kube)
    path = f"{api.scaledjobs('media')}/{name}/status"
    for call in (
        lambda: objects.get(path),
        lambda: objects.patch(path, {}),
        lambda: objects.delete(path),
        lambda: objects.list(f"/api/v1/namespaces/{name}/secrets"),
    ):
        with pytest.raises(InvalidName, match="refused unsent"):
            await call()
    with pytest.raises(InvalidName, match="refused unsent"):
        await anext(aiter(objects.watch(path, resource_version="1")))
    assert kube.requests == {}, "nothing was sent"


@pytest.mark.parametrize("ns", ["../kube-system", "kube.system", "A", ""])
async def test_the_kube_client_refuses_a_bad_namespace_without_a_request(
    kube: KubeJobClient, ns: str
) -> None:
    calls = [
        *_kube_calls("ok", ns),
        lambda k: k.list_jobs(ns, "a=b"),
        lambda k: k.list_pods(ns, "a=b"),
        lambda k: k.record_event(
            namespace=ns, job_name="j", job_uid=None, type="Normal", reason="R", message="m"
        ),
    ]
    for call in calls:
        with pytest.raises(InvalidName, match=r"namespace|request path"):
            await call(kube)
    assert kube.requests == {}, "nothing was sent"


async def test_a_valid_name_is_sent(kube: KubeJobClient) -> None:
    """The other side of the two tests above: with a valid name the request goes out
    (and fails to connect), so InvalidName there is the check, not the port."""
    from jobrunner.core.protocols import TransientError

    with pytest.raises(TransientError, match="unreachable"):
        await kube.read_secret("media", "broker")
    assert kube.requests == {"GET": 1}


def test_the_memory_twin_refuses_what_the_real_client_refuses() -> None:
    store = MemoryObjects()
    with pytest.raises(InvalidName):
        store.find("/api/v1/namespaces/a/secrets/../../kube-system/secrets/admin")


async def test_a_local_job_directory_is_never_left_by_a_name(tmp_path: Path) -> None:
    state = tmp_path / "state"
    outside = tmp_path / "state" / "jobs" / "other" / "victim"
    outside.mkdir(parents=True)
    (outside / "secret.json").write_text(json.dumps({"data": {"queue": "c2VjcmV0"}}))
    jobs = LocalJobClient(state, controller=False)
    for name in ("..", "../other/victim", "../../jobs/other/victim", "a/b", "."):
        with pytest.raises(InvalidName):
            jobs.jobdir("default", name)
        with pytest.raises(InvalidName):
            await jobs.read_secret("default", f"{name}-message")
        with pytest.raises(InvalidName):
            await jobs.delete_job("default", name)
    with pytest.raises(InvalidName):
        await jobs.list_jobs("../jobs", "")
    assert (outside / "secret.json").is_file(), "nothing outside was deleted"
    assert jobs.jobdir("default", "work-1").path == state / "jobs" / "default" / "work-1"


# ---------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["logs", "../../kube-system/x"], "argument JOB: a Job name must be lowercase"),
        (["logs", "--local", "../x"], "argument JOB: a Job name must be lowercase"),
        (["finalizers", "list", "--scaledjob", "a,b!=c"], "a ScaledJob name must be lowercase"),
    ],
)
def test_the_command_line_refuses_names_that_are_not_ones_before_any_request(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- a whole replica
@pytest.fixture
async def env() -> AsyncIterator[Env]:
    from jobrunner.core.tasks import stop_tasks

    e = Env()
    yield e
    for r in e.replicas:
        r.stop.set()
    await stop_tasks([r.task for r in e.replicas], grace=10)


async def test_a_taken_over_keda_object_naming_another_namespaces_secret_reads_nothing(
    env: Env,
) -> None:
    """keda.sh's CRDs have no pattern for names: the operator's own check is what keeps
    the Secret of another namespace unread."""
    marker = "queue-of-kube-system"
    env.jobs.secrets[("kube-system", "admin")] = {"data": {"queue": "cXVldWUtb2Yta3ViZS1zeXN0ZW0="}}
    r = env.replica("r1", keda_takeover=True)
    await env.admin.create(
        api.trigger_authentications(NS, keda=True),
        _authentication("../../kube-system/secrets/admin", keda=True),
    )
    keda = copy.deepcopy(_with_auth_ref("broker"))
    keda["apiVersion"] = "keda.sh/v1alpha1"
    keda["metadata"]["annotations"] = {
        "jobrunner.dev/takeover": "true",
        "autoscaling.keda.sh/paused": "true",
    }
    await env.apply(keda, keda=True)
    await until(lambda: "InvalidSpec" in env.events("work"))
    messages = [
        e["message"]
        for e in env.store.items(api.events(NS))
        if e["involvedObject"]["name"] == "work"
    ]
    assert any("secretTargetRef[1].name" in m and "DNS-1123" in m for m in messages), messages
    assert r.serving() == set()
    assert env.jobs.calls.get("read_secret", 0) == 0, "no Secret was asked for"
    assert marker not in json.dumps(env.store.items(api.events(NS)))
    await asyncio.sleep(0.3)  # a retry would read it now: none comes
    assert env.jobs.calls.get("read_secret", 0) == 0


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("volumes", "../../../../escaped"),
        ("volumes", "a/b"),
        ("containers", "../../../escaped"),
        ("containers", "Main"),
        ("initContainers", ".."),
    ],
)
async def test_a_local_job_whose_container_or_volume_name_is_a_path_is_refused(
    tmp_path: Path, key: str, name: str
) -> None:
    """Those names become files in the Job's directory; a template may render them from
    the message. The API server refuses them on a cluster (422); so does the local
    executor, before anything is written."""
    container: dict[str, Any] = {"name": "main", "image": "busybox", "command": ["true"]}
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if key == "volumes":
        pod["volumes"] = [{"name": name, "emptyDir": {}}]
    elif key == "containers":
        container["name"] = name
    else:
        pod["initContainers"] = [{**container, "name": name}]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "work-1", "namespace": "default"},
        "spec": {"template": {"spec": pod}},
    }
    jobs = LocalJobClient(tmp_path / "state", controller=False)
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(job, None)
    assert refused.value.status == 422
    assert f"spec.template.spec.{key}[0].name: it must be lowercase" in refused.value.message
    assert not (tmp_path / "state").exists(), "nothing written"
