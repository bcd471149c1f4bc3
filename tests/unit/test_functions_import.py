"""``jobrunner functions import``: bindings mapped as Core Tools maps them to KEDA,
%Setting% resolved, connection strings only in the Secret, unsupported functions listed
with the reason, and every manifest written is one jobrunner loads and renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.cli import main as cli
from jobrunner.core.models import Delivery
from jobrunner.dispatch.outputs import RESULT_ANNOTATION
from jobrunner.functions import invoker
from jobrunner.manifest.loader import load_manifest
from jobrunner.rendering.renderer import Renderer

ROOT = Path(__file__).resolve().parents[2]
STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=c2VjcmV0;QueueEndpoint=http://q/a;"
)
RABBIT = "amqp://user:rabbit-secret@rabbit:5672/"


def app(tmp_path: Path, functions: dict[str, list[dict[str, Any]]], **host: Any) -> Path:
    root = tmp_path / "shop"
    root.mkdir()
    (root / "host.json").write_text(
        json.dumps(
            {
                "version": "2.0",
                "customHandler": {"description": {"defaultExecutablePath": "handler"}},
                **host,
            }
        )
    )
    (root / "local.settings.json").write_text(
        json.dumps(
            {
                "Values": {
                    "AzureWebJobsStorage": STORAGE,
                    "AzureWebJobsOther": STORAGE,
                    "Rabbit": RABBIT,
                    "Brokers": "kafka-1:9092,kafka-2:9092",
                    "KafkaUser": "alice",
                    "KafkaPassword": "kafka-secret",
                    "OrdersQueue": "orders-from-setting",
                }
            }
        )
    )
    for name, bindings in functions.items():
        (root / name).mkdir()
        (root / name / "function.json").write_text(json.dumps({"bindings": bindings}))
    return root


def trigger(kind: str, **props: Any) -> dict[str, Any]:
    return {"type": kind, "direction": "in", "name": "msg", **props}


def output(kind: str, name: str, **props: Any) -> dict[str, Any]:
    return {"type": kind, "direction": "out", "name": name, **props}


def run_import(root: Path, out: Path, *extra: str) -> int:
    return cli(["functions", "import", str(root), "-o", str(out), *extra])


def docs(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        out.setdefault(doc["kind"], []).append(doc)
    return out


def auth_of(found: dict[str, list[dict[str, Any]]], name: str) -> dict[str, str]:
    (auth,) = [a for a in found["TriggerAuthentication"] if a["metadata"]["name"] == name]
    # The ScaledJob's group: `kubectl apply` of the files must work with the operator,
    # which looks a jobrunner.dev ScaledJob's authenticationRef up in jobrunner.dev.
    (scaledjob,) = found["ScaledJob"]
    assert auth["apiVersion"] == scaledjob["apiVersion"] == "jobrunner.dev/v1alpha1"
    return {r["parameter"]: r["key"] for r in auth["spec"]["secretTargetRef"]}


def test_queue_trigger_maps_to_azure_queue_with_the_connection_from_the_secret(
    tmp_path: Path,
) -> None:
    root = app(
        tmp_path, {"Orders": [trigger("queueTrigger", queueName="orders", connection="Other")]}
    )
    assert run_import(root, tmp_path / "out") == 0
    found = docs(tmp_path / "out" / "shop-orders.yaml")
    (scaledjob,) = found["ScaledJob"]
    (trig,) = scaledjob["spec"]["triggers"]
    assert trig["type"] == "azure-queue"
    assert trig["metadata"] == {"queueName": "orders", "messageEncoding": "base64"}
    # "Other" finds the AzureWebJobs-prefixed setting, as the host does.
    assert auth_of(found, trig["authenticationRef"]["name"]) == {"connection": "AzureWebJobsOther"}
    assert "c2VjcmV0" not in yaml.safe_dump(scaledjob)  # never inlined
    (secret,) = found["Secret"]
    assert secret["metadata"]["name"] == "shop-settings"
    assert set(secret["data"]) >= {"AzureWebJobsStorage", "AzureWebJobsOther"}
    # The file holds the app's settings (connection strings): private to its writer.
    assert (tmp_path / "out" / "shop-orders.yaml").stat().st_mode & 0o777 == 0o600


def test_rabbitmq_trigger_maps_to_rabbitmq_with_the_host_from_the_secret(tmp_path: Path) -> None:
    root = app(
        tmp_path,
        {"Jobs": [trigger("rabbitMQTrigger", queueName="work", connectionStringSetting="Rabbit")]},
    )
    assert run_import(root, tmp_path / "out") == 0
    found = docs(tmp_path / "out" / "shop-jobs.yaml")
    (trig,) = found["ScaledJob"][0]["spec"]["triggers"]
    assert trig["type"] == "rabbitmq"
    assert trig["metadata"] == {"queueName": "work"}
    assert auth_of(found, trig["authenticationRef"]["name"]) == {"host": "Rabbit"}
    assert "rabbit-secret" not in yaml.safe_dump(found["ScaledJob"])


def test_kafka_trigger_maps_broker_list_to_bootstrap_servers_and_sasl_to_the_secret(
    tmp_path: Path,
) -> None:
    root = app(
        tmp_path,
        {
            "Events": [
                trigger(
                    "kafkaTrigger",
                    topic="events",
                    brokerList="%Brokers%",
                    consumerGroup="shop",
                    authenticationMode="Plain",
                    protocol="SaslSsl",
                    username="%KafkaUser%",
                    password="%KafkaPassword%",
                )
            ]
        },
    )
    assert run_import(root, tmp_path / "out") == 0
    found = docs(tmp_path / "out" / "shop-events.yaml")
    (trig,) = found["ScaledJob"][0]["spec"]["triggers"]
    assert trig["type"] == "kafka"
    assert trig["metadata"] == {
        "topic": "events",
        "bootstrapServers": "kafka-1:9092,kafka-2:9092",
        "consumerGroup": "shop",
        "sasl": "plaintext",
        "tls": "enable",
    }
    assert auth_of(found, trig["authenticationRef"]["name"]) == {
        "username": "KafkaUser",
        "password": "KafkaPassword",
    }
    assert "kafka-secret" not in yaml.safe_dump(found["ScaledJob"])


def test_queue_rabbitmq_kafka_and_return_outputs_are_mapped(tmp_path: Path) -> None:
    root = app(
        tmp_path,
        {
            "Fan": [
                trigger("queueTrigger", queueName="in"),
                output("queue", "toQueue", queueName="out-q"),
                output("rabbitMQ", "toRabbit", queueName="out-r", connectionStringSetting="Rabbit"),
                output("kafka", "toKafka", topic="out-k", brokerList="%Brokers%"),
                output("queue", "$return", queueName="out-return"),
            ]
        },
    )
    assert run_import(root, tmp_path / "out") == 0
    found = docs(tmp_path / "out" / "shop-fan.yaml")
    (scaledjob,) = found["ScaledJob"]
    outputs = {o["name"]: o for o in scaledjob["spec"]["function"]["outputs"]}
    assert {n: (o["type"], o["metadata"]) for n, o in outputs.items()} == {
        "toQueue": ("azure-queue", {"queueName": "out-q", "messageEncoding": "base64"}),
        "toRabbit": ("rabbitmq", {"queueName": "out-r"}),
        "toKafka": ("kafka", {"topic": "out-k", "bootstrapServers": "kafka-1:9092,kafka-2:9092"}),
        "$return": ("azure-queue", {"queueName": "out-return", "messageEncoding": "base64"}),
    }
    assert auth_of(found, outputs["toRabbit"]["authenticationRef"]["name"]) == {"host": "Rabbit"}
    invoker_args = scaledjob["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]["command"]
    assert invoker_args[invoker_args.index("--outputs") + 1] == "toQueue,toRabbit,toKafka,$return"


@pytest.mark.parametrize(
    "trigger_binding",
    [
        trigger("kafkaTrigger", topic="events", brokerList="%Brokers%", consumerGroup="shop"),
        trigger("queueTrigger", queueName="in"),
    ],
    ids=["trigger-without-secrets", "trigger-with-secrets"],
)
def test_every_authentication_ref_names_a_written_authentication_and_none_is_unused(
    tmp_path: Path, trigger_binding: dict[str, Any]
) -> None:
    """The kind of a dropped TriggerAuthentication: a trigger that needs no secrets beside
    outputs that do. Each authenticationRef of the ScaledJob (trigger and outputs) names a
    TriggerAuthentication of the file, and each one written is named by one."""
    root = app(
        tmp_path,
        {
            "Fan": [
                trigger_binding,
                output("rabbitMQ", "toRabbit", queueName="out-r", connectionStringSetting="Rabbit"),
                output("kafka", "toKafka", topic="out-k", brokerList="%Brokers%"),
                output("queue", "toQueue", queueName="out-q"),
            ]
        },
    )
    assert run_import(root, tmp_path / "out") == 0
    found = docs(tmp_path / "out" / "shop-fan.yaml")
    (scaledjob,) = found["ScaledJob"]
    spec = scaledjob["spec"]
    refs = [
        item["authenticationRef"]["name"]
        for item in [*spec["triggers"], *spec["function"]["outputs"]]
        if "authenticationRef" in item
    ]
    written = [a["metadata"]["name"] for a in found.get("TriggerAuthentication", [])]
    assert sorted(refs) == sorted(written)
    outputs = {o["name"]: o for o in spec["function"]["outputs"]}
    assert auth_of(found, outputs["toRabbit"]["authenticationRef"]["name"]) == {"host": "Rabbit"}


def test_a_percent_setting_is_resolved_from_local_settings(tmp_path: Path) -> None:
    root = app(tmp_path, {"Orders": [trigger("queueTrigger", queueName="%OrdersQueue%")]})
    assert run_import(root, tmp_path / "out") == 0
    (scaledjob,) = docs(tmp_path / "out" / "shop-orders.yaml")["ScaledJob"]
    assert scaledjob["spec"]["triggers"][0]["metadata"]["queueName"] == "orders-from-setting"


def test_a_missing_setting_is_reported_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = app(tmp_path, {"Orders": [trigger("queueTrigger", queueName="%Nope%")]})
    assert run_import(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "not imported: Orders:" in err
    assert "names app setting Nope, which local.settings.json does not have" in err
    assert run_import(root, tmp_path / "out2", "--setting", "Nope=given-here") == 0


def test_unsupported_triggers_and_bindings_are_listed_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = app(
        tmp_path,
        {
            "Web": [trigger("httpTrigger"), output("http", "res")],
            "Cron": [trigger("timerTrigger", schedule="0 * * * * *")],
            "Blobs": [trigger("blobTrigger", path="in/{name}")],
            "Bus": [trigger("serviceBusTrigger", queueName="q")],
            "ToBlob": [trigger("queueTrigger", queueName="q"), output("blob", "b", path="x")],
            "WithInput": [
                trigger("queueTrigger", queueName="q"),
                {"type": "blob", "direction": "in", "name": "extra", "path": "x"},
            ],
            "Good": [trigger("queueTrigger", queueName="good")],
        },
    )
    assert run_import(root, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "not imported: Web: httpTrigger: an HTTP function answers requests" in err
    assert "not imported: Cron: timerTrigger: a timer fires on a schedule" in err
    assert "not imported: Blobs: blobTrigger: jobrunner has no source for blobTrigger" in err
    assert "not imported: Bus: serviceBusTrigger: jobrunner has no source" in err
    assert "not imported: ToBlob: output binding 'b' (blob): jobrunner publishes queue" in err
    assert "not imported: WithInput: input binding 'extra' (blob)" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.yaml")) == [
        "shop-good.yaml",
        "shop-policy.yaml",
        "shop-rbac.yaml",
    ]


def test_a_python_v2_app_is_indexed_with_the_real_library(tmp_path: Path) -> None:
    root = tmp_path / "pyapp"
    root.mkdir()
    (root / "host.json").write_text('{"version": "2.0"}')
    (root / "function_app.py").write_text(
        """
import azure.functions as func
app = func.FunctionApp()

@app.queue_trigger(arg_name="msg", queue_name="thumbs", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="done", connection="AzureWebJobsStorage")
def render(msg: func.QueueMessage, out: func.Out[str]) -> None: ...

@app.function_name("Rabbit")
@app.generic_trigger(
    arg_name="m", type="rabbitMQTrigger", queue_name="r", connection_string_setting="R"
)
def rabbit(m: str) -> None: ...

@app.route(route="hi")
def hi(req: func.HttpRequest) -> func.HttpResponse: ...
"""
    )
    (root / "local.settings.json").write_text(
        json.dumps({"Values": {"AzureWebJobsStorage": STORAGE, "R": RABBIT}})
    )
    assert run_import(root, tmp_path / "out") == 0
    render = docs(tmp_path / "out" / "pyapp-render.yaml")["ScaledJob"][0]
    assert render["spec"]["triggers"][0]["metadata"]["queueName"] == "thumbs"
    assert render["spec"]["function"]["outputs"][0]["metadata"]["queueName"] == "done"
    pod = render["spec"]["jobTargetRef"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][-2:] == ["install", "/jobrunner"]
    assert pod["containers"][0]["command"][:3] == ["python3", "/jobrunner/invoker.py", "python"]
    rabbit = docs(tmp_path / "out" / "pyapp-rabbit.yaml")["ScaledJob"][0]
    assert rabbit["spec"]["triggers"][0]["type"] == "rabbitmq"
    assert not (tmp_path / "out" / "pyapp-hi.yaml").exists()


@pytest.mark.parametrize("example", ["custom-handler", "python-app"])
@pytest.mark.parametrize("local", [False, True])
def test_the_examples_import_into_manifests_that_load_and_render(
    example: str, local: bool, tmp_path: Path
) -> None:
    extra = ["--local"] if local else []
    assert run_import(ROOT / "examples/functions" / example, tmp_path / "out", *extra) == 0
    manifests = [
        p
        for p in (tmp_path / "out").glob("*.yaml")
        if not p.name.endswith(("-rbac.yaml", "-policy.yaml"))
    ]
    assert manifests
    for path in manifests:
        scaledjob = load_manifest(path).scaledjobs[0]
        delivery = Delivery(source="azure-queue", identity="m1", body=b'{"id": 1}', message_id="m1")
        job = Renderer(scaledjob, base_dirs=[path.parent]).render(delivery).job
        pod = job["spec"]["template"]["spec"]
        names = [c["name"] for c in pod["containers"]]
        assert any(e["name"] == "JOBRUNNER_MESSAGE" for e in pod["containers"][0]["env"]), names


def test_the_invoker_writes_the_annotation_the_dispatcher_reads() -> None:
    assert invoker.RESULT_ANNOTATION == RESULT_ANNOTATION


# ------------------------------------------------------------------ names
QUEUE = trigger("queueTrigger", queueName="orders", connection="AzureWebJobsStorage")


def scaledjob_names(out: Path) -> dict[str, str]:
    """Function name -> ScaledJob name, for every ScaledJob file written."""
    names = {}
    for path in out.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "ScaledJob":
                assert path.name == f"{doc['metadata']['name']}.yaml"
                names[doc["spec"]["function"]["name"]] = doc["metadata"]["name"]
    return names


def test_functions_sharing_a_long_prefix_are_two_scaledjobs_with_stable_names(
    tmp_path: Path,
) -> None:
    long = "ProcessCustomerOrderConfirmationEmail"
    functions = {f"{long}High": [QUEUE], f"{long}Low": [QUEUE], "Short": [QUEUE]}
    root = app(tmp_path, functions)
    assert run_import(root, tmp_path / "a") == 0
    names = scaledjob_names(tmp_path / "a")
    assert set(names) == set(functions)  # none lost
    assert len(set(names.values())) == 3
    assert names["Short"] == "shop-short"  # fits: only lower-cased
    for name in names.values():
        assert len(name) <= 40
    for path in (tmp_path / "a").glob("shop-*.yaml"):
        if "rbac" not in path.name and "policy" not in path.name:
            load_manifest(path)
    # The same names on every import (a hash of the name, not of the order or the set).
    del functions["Short"]
    (root / "Short" / "function.json").unlink()
    (root / "Short").rmdir()
    assert run_import(root, tmp_path / "b") == 0
    again = scaledjob_names(tmp_path / "b")
    assert again == {k: v for k, v in names.items() if k != "Short"}


def test_names_that_differ_only_in_characters_a_label_cannot_hold_stay_apart(
    tmp_path: Path,
) -> None:
    root = app(tmp_path, {"Process_Order": [QUEUE], "Process.Order": [QUEUE]})
    assert run_import(root, tmp_path / "out") == 0
    names = scaledjob_names(tmp_path / "out")
    assert set(names) == {"Process_Order", "Process.Order"}
    assert len(set(names.values())) == 2


def test_names_that_still_collide_are_an_error_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Function names are case-insensitive to the host; on Linux two folders can differ
    # in case only.
    root = app(tmp_path, {"Work": [QUEUE], "work": [QUEUE]})
    assert run_import(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "function work" in err
    assert "function Work" in err
    assert "rename one of them" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_function_cannot_overwrite_the_apps_rbac_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = app(tmp_path, {"Rbac": [QUEUE], "Work": [QUEUE]})
    assert run_import(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "shop-rbac.yaml" in err
    assert "function Rbac" in err


def test_apps_whose_names_share_a_long_prefix_get_their_own_secret_and_account(
    tmp_path: Path,
) -> None:
    names = []
    for suffix in ("eu", "us"):
        root = tmp_path / f"src-{suffix}"
        root.mkdir()
        made = app(root, {"Work": [QUEUE]})
        target = root / f"customer-notifications-service-{suffix}"
        made.rename(target)
        out = tmp_path / f"out-{suffix}"
        assert run_import(target, out) == 0
        found = docs(next(p for p in out.glob("*.yaml") if "ScaledJob" in p.read_text()))
        (secret,) = found["Secret"]
        names.append(secret["metadata"]["name"])
        assert (out / f"{secret['metadata']['name'].removesuffix('-settings')}-rbac.yaml").exists()
    assert names[0] != names[1]
    assert all(len(n.removesuffix("-settings")) <= 24 for n in names)


def test_importing_the_apps_host_json_says_to_give_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """i21, N8: it said '…/host.json: no host.json'."""
    (tmp_path / "host.json").write_text('{"version": "2.0"}')
    code = cli(["functions", "import", str(tmp_path / "host.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{tmp_path / 'host.json'}: is a file; give the function app's directory" in err
    assert f"e.g. {tmp_path}" in err
