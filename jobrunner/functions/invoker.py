"""The in-Job invoker: runs inside a Job, hands the Job's one message to an Azure
Functions-style function exactly as the Functions host would, and turns the result into
the Job's outcome (exit 0 or 1) and a result record on the Job.

It runs inside users' images, so it is ONE file that needs the standard library only
(Python >= 3.9), and it imports nothing from jobrunner: ``python invoker.py install DIR``
copies it (an init container does this from the jobrunner image into a shared
``emptyDir``), and the function's image runs it from there.

Two modes:

``custom-handler --function NAME [--port P] [--binding msg] [--outputs a,b] [--timeout S]``
    The handler (any language) runs beside it as a native sidecar. The invoker waits
    until ``http://127.0.0.1:P/`` gives any HTTP answer (as the host's
    DefaultHttpWorkerService.IsWorkerReady does, polling every 25 ms), then POSTs
    ``{"Data": {...}, "Metadata": {...}}`` to ``/NAME`` with the host's headers
    (``X-Azure-Functions-InvocationId``, ``X-Azure-Functions-HostVersion``,
    ``User-Agent: Azure-Functions-Host/...``). A non-2xx answer fails the invocation
    (EnsureSuccessStatusCode), and so does a 2xx whose body is not a JSON object.
    From the answer: ``Logs`` (strings) go to stdout, the Job's log; ``Outputs``
    (by output binding name) and ``ReturnValue`` (for ``$return``) are the outputs.
    Contract: learn.microsoft.com "Azure Functions custom handlers" (request and
    response payloads); host src/WebJobs.Script/Workers/Http/.

``python --app DIR --function NAME [--outputs a,b] [--timeout S]``
    A Python function app, v1 (``NAME/function.json`` with ``scriptFile`` default
    ``__init__.py`` and ``entryPoint`` default ``main``) or v2 (``function_app.py``
    with one ``azure.functions.FunctionApp``), called in this process without the
    Functions host, with the binding type the function declares: a parameter
    annotated ``str`` gets the text, ``bytes`` the body, otherwise the trigger's
    ``azure.functions`` type (``QueueMessage`` with ``id``, ``dequeue_count``, times and
    ``pop_receipt``; ``KafkaEvent``); ``func.Out`` parameters collect outputs; the return
    value is ``$return``; ``context`` gets an object with ``invocation_id``,
    ``function_name`` and ``function_directory``. An exception fails the invocation
    with its type and message (the traceback goes to the log).

Both modes: ``--timeout S`` is host.json ``functionTimeout``, a limit on each invocation
(each try of the Job), not on the Job (see ``start_timeout``); ``DequeueCount`` (and a
``QueueMessage``'s ``dequeue_count``) is the try this is, 1, 2, 3 ... (see
``dequeue_count``).

The message comes from the Job's environment as jobrunner puts it there:
``JOBRUNNER_MESSAGE`` (or the file ``JOBRUNNER_MESSAGE_FILE``),
``JOBRUNNER_MESSAGE_ENCODING`` (``utf-8`` or ``base64``), ``JOBRUNNER_MESSAGE_ID``,
``JOBRUNNER_MESSAGE_HEADERS`` and ``JOBRUNNER_MESSAGE_METADATA`` (JSON objects),
``JOBRUNNER_SOURCE`` (the trigger type), ``JOBRUNNER_DELIVERY_COUNT`` (which delivery of
the message made the Job).

**The result record.** Whatever happened is written as the JSON annotation
``jobrunner.dev/function-result`` on the Job: ``{"status": "succeeded", "outputs":
{binding: [base64 message, ...]}}`` or ``{"status": "failed", "error": "..."}``; the
dispatcher publishes the outputs when it settles the message (exactly once, see
jobrunner.dispatch.outputs) and puts the error in the dead letter's reason. In a cluster the
invoker patches its own Job through the API server with the pod's service account
(needs ``patch`` on ``jobs``; the patch names the Job's uid, so it lands on that Job or
nowhere); under jobrunner's local executor it writes ``job-annotations.json`` in the
Job's directory (``JOBRUNNER_LOCAL_JOB_DIR``). A success whose outputs cannot be
recorded is a failure: the Job must not complete without them.

**The record is authenticated** (see jobrunner.core.marks): beside it goes
``jobrunner.dev/function-result-mac``, an HMAC-SHA256 of the record and the Job's
namespace, name and uid under the Job's own key, which jobrunner keeps in the Job's
message Secret and mounts into this container only (``JOBRUNNER_FUNCTION_KEY_FILE``; the
uid comes as ``JOBRUNNER_JOB_UID`` from the pod's controller-uid label, or locally from
the Job's ``job.json``). The dispatcher ignores a record whose MAC does not verify, so a
pod can vouch for its own Job only. Without a key nothing is recorded (a success then
fails): an unauthenticated record would be ignored anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
import hmac
import http.client
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import ssl
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

RESULT_ANNOTATION = "jobrunner.dev/function-result"
"""Must equal jobrunner.dispatch.outputs.RESULT_ANNOTATION (a test checks it)."""
RESULT_MAX_BYTES = 200 * 1024
"""The result record must fit in the Job's annotations (256 KiB in all)."""
HOST_VERSION = "4.1037.0"
"""The Functions host version the headers claim (the notes' snapshot)."""
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
KEY_FILE = "/var/run/jobrunner/function-key/function-key"
"""Where jobrunner mounts the Job's key (jobrunner.core.marks.KEY_MOUNT/KEY_DATA)."""
KEY_WAIT_SECONDS = 10.0
"""How long to wait for the key file to appear (the kubelet mounts the Secret before the
container starts; a local executor might write it a moment late)."""
MARK_DOMAIN = "jobrunner.dev/mark/v1"
"""Must equal jobrunner.core.marks.DOMAIN (a test checks that both compute the same MAC)."""


class InvocationFailed(Exception):
    """The function did not succeed; the text says why, for the dead letter."""


# ----------------------------------------------------------------- the message
class Message:
    """The Job's message, read from the environment jobrunner gives every container."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        if "JOBRUNNER_MESSAGE" in env:
            raw = env["JOBRUNNER_MESSAGE"].encode("utf-8")
        elif env.get("JOBRUNNER_MESSAGE_FILE"):
            raw = Path(env["JOBRUNNER_MESSAGE_FILE"]).read_bytes()
        else:
            raise InvocationFailed(
                "no message: neither JOBRUNNER_MESSAGE nor JOBRUNNER_MESSAGE_FILE is set "
                "(is messageDelivery.containers leaving this container out?)"
            )
        if env.get("JOBRUNNER_MESSAGE_ENCODING") == "base64" and "JOBRUNNER_MESSAGE" in env:
            raw = base64.b64decode(raw)
        self.body: bytes = raw
        self.id = env.get("JOBRUNNER_MESSAGE_ID", "")
        self.source = env.get("JOBRUNNER_SOURCE", "")
        self.headers: dict[str, str] = json.loads(env.get("JOBRUNNER_MESSAGE_HEADERS") or "{}")
        self.metadata: dict[str, str] = json.loads(env.get("JOBRUNNER_MESSAGE_METADATA") or "{}")
        self.job_name = env.get("JOBRUNNER_JOB_NAME", "")
        self.dequeue_count = dequeue_count(env, self.metadata)

    @property
    def text(self) -> str | None:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None


def prior_failures(env: dict[str, str]) -> int:
    """How many tries (pods) of this Job failed before this one, from the Job's
    ``status.failed``, which the Job controller raises before it makes the next pod
    (after a back-off of 10 s or more; kubernetes.io "Jobs: Pod backoff failure
    policy"): under the local executor from the Job's ``status.json`` (its supervisor
    does the same), in a cluster from the answer to a PATCH of this Job that changes
    nothing (the invoker's Role has ``patch`` and no ``get``, and the admission policy
    lets a pod's token reach its own Job only). 0, with a line in the log, when it
    cannot be known: the function then runs with a lower ``DequeueCount`` rather than
    not at all."""
    local = env.get("JOBRUNNER_LOCAL_JOB_DIR")
    try:
        if local:
            status = json.loads((Path(local) / "status.json").read_text())
        else:
            namespace, name, uid = job_identity(env)
            job = _patch_own_job({}, env, namespace=namespace, name=name, uid=uid)
            status = job.get("status") or {}
        return max(0, int(status.get("failed") or 0))
    except (InvocationFailed, OSError, ValueError, TypeError, AttributeError) as exc:
        print(
            f"jobrunner-invoker: cannot tell the Job's earlier tries ({exc}); DequeueCount "
            "counts this delivery only",
            file=sys.stderr,
        )
        return 0


def dequeue_count(env: dict[str, str], metadata: dict[str, str]) -> int:
    """``DequeueCount`` as the Functions host reports it, 1 on the first try: the
    delivery of the message that made the Job (``JOBRUNNER_DELIVERY_COUNT``, the
    broker's own count where it has one: see jobrunner.core.models.Delivery.delivery_count;
    an Azure queue message's ``DequeueCount`` metadata for a Job made before that
    variable existed) plus the Job's failed tries before this one (each try of the host
    is one dequeue, and each try here is one pod of the Job)."""
    base = _int(env.get("JOBRUNNER_DELIVERY_COUNT")) or _int(metadata.get("DequeueCount")) or 1
    return max(1, base) + prior_failures(env)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def trigger_metadata(message: Message) -> dict[str, Any]:
    """The trigger's binding data under the names the Functions host uses for the
    trigger the message came from (keys ending in "Trigger" are dropped, as the host
    does in ScriptInvocationContextExtensions).

    * azure-queue (QueueTriggerBinding.cs): Id, DequeueCount (a number),
      InsertionTime, ExpirationTime, NextVisibleTime, PopReceipt;
    * every source: DequeueCount, the try this is (``dequeue_count``; the host has it
      for queue triggers only, jobrunner gives it for every source);
    * rabbitmq (the RabbitMQ extension): Exchange, RoutingKey, BasicProperties
      (MessageId, Headers, ContentType) as far as jobrunner knows them;
    * kafka (the Kafka extension): Topic, Partition, Offset, Key, Headers;
    * the embedded queue: Id and DequeueCount, as a queue.
    """
    meta = message.metadata
    if message.source == "azure-queue":
        return {
            "Id": meta.get("Id", message.id),
            "DequeueCount": message.dequeue_count,
            "InsertionTime": meta.get("InsertionTime", ""),
            "ExpirationTime": meta.get("ExpirationTime", ""),
            "NextVisibleTime": meta.get("NextVisibleTime", ""),
            "PopReceipt": meta.get("PopReceipt", ""),
        }
    if message.source == "rabbitmq":
        return {
            "Exchange": meta.get("exchange", ""),
            "RoutingKey": meta.get("routing_key", ""),
            "BasicProperties": {"MessageId": message.id, "Headers": message.headers},
            "DequeueCount": message.dequeue_count,
        }
    if message.source == "kafka":
        return {
            "Topic": meta.get("topic", ""),
            "Partition": _int(meta.get("partition")),
            "Offset": _int(meta.get("offset")),
            "Key": meta.get("key", ""),
            "Headers": [{"Key": k, "Value": v} for k, v in message.headers.items()],
            "DequeueCount": message.dequeue_count,
        }
    return {"Id": message.id, "DequeueCount": message.dequeue_count}


def sys_metadata(function: str) -> dict[str, Any]:
    """The host's ``sys`` entry: MethodName, UtcNow, RandGuid."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "MethodName": function,
        "UtcNow": now.isoformat().replace("+00:00", "Z"),
        "RandGuid": str(uuid.uuid4()),
    }


# ----------------------------------------------------------------- the result record
def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def output_messages(value: Any) -> list[bytes]:
    """An output value as the messages it stands for: a list is one message per item
    (the host takes a list for a queue output), ``None`` none, bytes as they are, text
    as UTF-8, anything else as JSON text."""
    if value is None:
        return []
    if isinstance(value, list):
        return [_one(item) for item in value if item is not None]
    return [_one(value)]


def _one(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    get_body = getattr(value, "get_body", None)
    if callable(get_body):
        body = get_body()
        return body if isinstance(body, bytes) else str(body).encode("utf-8")
    return json.dumps(value).encode("utf-8")


def mark_mac(
    *, key: bytes, namespace: str, name: str, uid: str, annotation: str, value: str
) -> str:
    """The MAC of one mark on a Job: jobrunner.core.marks.mark_mac, restated here because the
    invoker imports nothing of jobrunner."""
    message = "\n".join((MARK_DOMAIN, namespace, name, uid, annotation, value)).encode()
    return "v1:" + hmac.new(key, message, hashlib.sha256).hexdigest()


def read_key(env: dict[str, str]) -> bytes:
    """The Job's key, from ``JOBRUNNER_FUNCTION_KEY_FILE`` (default ``KEY_FILE``),
    waiting up to ``KEY_WAIT_SECONDS`` for it to appear. InvocationFailed without one."""
    path = Path(env.get("JOBRUNNER_FUNCTION_KEY_FILE") or KEY_FILE)
    deadline = time.monotonic() + KEY_WAIT_SECONDS
    while True:
        try:
            key = path.read_bytes()
        except OSError:
            key = b""
        if key:
            return key
        if time.monotonic() >= deadline:
            raise InvocationFailed(
                f"cannot authenticate the result: no key at {path} (jobrunner mounts the "
                "Job's key from its message Secret into the containers that get the "
                "message; was the Job made by jobrunner from a ScaledJob with spec.function?)"
            )
        time.sleep(0.2)


def job_identity(env: dict[str, str]) -> tuple[str, str, str]:
    """(namespace, name, uid) of this Job: locally from its ``job.json``, in a cluster
    from ``JOBRUNNER_JOB_NAME``, ``JOBRUNNER_JOB_UID`` and the namespace
    (``JOBRUNNER_NAMESPACE`` or the service account's). InvocationFailed when one is
    unknown."""
    local = env.get("JOBRUNNER_LOCAL_JOB_DIR")
    if local:
        try:
            meta = json.loads((Path(local) / "job.json").read_text())["metadata"]
            return str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvocationFailed(f"cannot read this Job's identity from {local}: {exc}") from None
    sa = Path(env.get("JOBRUNNER_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT))
    name = env.get("JOBRUNNER_JOB_NAME", "")
    uid = env.get("JOBRUNNER_JOB_UID", "")
    namespace = env.get("JOBRUNNER_NAMESPACE", "")
    if not namespace:
        try:
            namespace = (sa / "namespace").read_text().strip()
        except OSError:
            namespace = ""
    if not (namespace and name and uid):
        raise InvocationFailed(
            "cannot record the result: this Job's namespace, name and uid must be known "
            f"(got {namespace!r}, {name!r}, {uid!r}: JOBRUNNER_NAMESPACE or the service "
            "account's namespace, JOBRUNNER_JOB_NAME, JOBRUNNER_JOB_UID)"
        )
    return namespace, name, uid


def record_result(result: dict[str, Any], env: dict[str, str] | None = None) -> None:
    """Write the result record, with its MAC, on the Job: locally into the Job's
    directory, in a cluster through the API server. Raises InvocationFailed when it
    cannot."""
    env = dict(os.environ if env is None else env)
    text = json.dumps(result, sort_keys=True)
    if len(text.encode()) > RESULT_MAX_BYTES:
        raise InvocationFailed(
            f"the outputs are {len(text.encode())} bytes, over the {RESULT_MAX_BYTES} a "
            "Job's annotations can carry"
        )
    namespace, name, uid = job_identity(env)
    mac = mark_mac(
        key=read_key(env),
        namespace=namespace,
        name=name,
        uid=uid,
        annotation=RESULT_ANNOTATION,
        value=text,
    )
    annotations = {RESULT_ANNOTATION: text, RESULT_ANNOTATION + "-mac": mac}
    local = env.get("JOBRUNNER_LOCAL_JOB_DIR")
    if local:
        path = Path(local) / "job-annotations.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(annotations)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, sort_keys=True))
        os.replace(tmp, path)
        return
    _patch_own_job(annotations, env, namespace=namespace, name=name, uid=uid)


def _patch_own_job(
    annotations: dict[str, str], env: dict[str, str], *, namespace: str, name: str, uid: str
) -> dict[str, Any]:
    """Merge ``annotations`` into this Job's (none: a patch that changes nothing) and
    return the Job as the API server answers. InvocationFailed when it cannot."""
    sa = Path(env.get("JOBRUNNER_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT))
    host = env.get("KUBERNETES_SERVICE_HOST")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (sa / "token").exists():
        raise InvocationFailed(
            "cannot reach the Job: no API server in reach (needs "
            "KUBERNETES_SERVICE_HOST and a service account token; "
            "automountServiceAccountToken must not be false)"
        )
    token = (sa / "token").read_text().strip()
    context = ssl.create_default_context(cafile=str(sa / "ca.crt"))
    host_part = f"[{host}]" if ":" in host else host
    url = f"https://{host_part}:{port}/apis/batch/v1/namespaces/{namespace}/jobs/{name}"
    # The uid makes the patch fail unless it lands on this very Job (not on a later Job of
    # the same name).
    body = json.dumps({"metadata": {"uid": uid, "annotations": annotations}}).encode()
    delay = 0.5
    for attempt in range(6):
        request = urllib.request.Request(url, data=body, method="PATCH")
        request.add_header("Content-Type", "application/merge-patch+json")
        request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as answer:
                job = json.loads(answer.read())
                return job if isinstance(job, dict) else {}
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 404, 409, 422):
                hint = (
                    f"is this pod's Job {name} uid {uid}?"
                    if exc.code in (409, 422)
                    else "the pod's service account needs patch on jobs"
                )
                raise InvocationFailed(
                    f"the API server refused to annotate Job {namespace}/{name}: {exc.code} "
                    f"{exc.reason}: {_reason_of(exc)}; {hint}"
                ) from None
            problem = f"{exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(exc)
        if attempt == 5:
            break
        time.sleep(delay)
        delay *= 2
    raise InvocationFailed(f"cannot reach Job {name} through the API server: {problem}")


def _reason_of(exc: urllib.error.HTTPError) -> str:
    """The API server's message in a refusal (a Status object), for the log."""
    try:
        return str(json.loads(exc.read()).get("message", ""))[:500]
    except (OSError, ValueError, AttributeError):
        return ""


_FINISHING = threading.RLock()
"""Held while the outcome is recorded: the timeout's watchdog never records a failure
over a result being recorded (nor the function's thread a result over a timeout)."""


def clock(seconds: float) -> str:
    """Seconds as host.json writes a timespan: ``hh:mm:ss``."""
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def start_timeout(seconds: float | None, function: str) -> threading.Timer | None:
    """The per-invocation limit (host.json ``functionTimeout``; the host's text on
    expiry, "Timeout value of 00:05:00 exceeded by function ..."): after ``seconds``
    this try fails, its failure recorded, and the process exits 1 at once, whatever
    the function is doing (a handler still answering, Python code blocked in C), as
    the host abandons the invocation. The Job's next try, if it has one, then starts
    with ``DequeueCount`` one higher. None or 0: no limit."""
    if not seconds or seconds <= 0:
        return None

    def expire() -> None:
        if not _FINISHING.acquire(blocking=False):
            return  # the function finished just now; its result is being recorded
        code = fail(
            f"Timeout value of {clock(seconds)} exceeded by function {function} "
            "(host.json functionTimeout, a limit on each try)"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def succeed(outputs: dict[str, Any], declared: list[str]) -> int:
    """Record a success with its outputs (only the declared bindings; others are named
    in the log and dropped, as the host ignores an Outputs key with no binding)."""
    with _FINISHING:
        return _succeed(outputs, declared)


def _succeed(outputs: dict[str, Any], declared: list[str]) -> int:
    kept: dict[str, list[str]] = {}
    for name, value in outputs.items():
        if name not in declared:
            print(f"jobrunner-invoker: output {name!r} has no output binding; ignored")
            continue
        kept[name] = [_b64(m) for m in output_messages(value)]
    try:
        record_result({"status": "succeeded", "outputs": kept})
    except InvocationFailed as exc:
        return fail(str(exc))
    count = sum(len(v) for v in kept.values())
    print(f"jobrunner-invoker: succeeded; {count} output message(s) recorded")
    return 0


def fail(error: str) -> int:
    """Record a failure with its reason (best effort: the exit code fails the Job
    anyway) and return the exit code."""
    with _FINISHING:
        return _fail(error)


def _fail(error: str) -> int:
    print(f"jobrunner-invoker: failed: {error}", file=sys.stderr)
    try:
        record_result({"status": "failed", "error": error[:4000]})
    except (InvocationFailed, OSError) as exc:
        print(f"jobrunner-invoker: could not record the failure: {exc}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------- custom handlers
def data_value(message: Message) -> Any:
    """The trigger value in ``Data``: the message text as a JSON string, or base64 text
    for a body that is not UTF-8 (as the host serialises byte[])."""
    text = message.text
    return text if text is not None else _b64(message.body)


def wait_until_listening(port: int, timeout: float) -> None:
    """Any HTTP answer on ``/`` means ready (DefaultHttpWorkerService.IsWorkerReady)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        finally:
            connection.close()
        time.sleep(0.025)
    raise InvocationFailed(
        f"the custom handler never answered on 127.0.0.1:{port} within {timeout:.0f}s "
        f"({last}); does it listen on FUNCTIONS_CUSTOMHANDLER_PORT?"
    )


def invoke_custom_handler(args: argparse.Namespace) -> int:
    message = Message()
    declared = [o for o in (args.outputs or "").split(",") if o]
    wait_until_listening(args.port, args.ready_timeout)
    # The host times the invocation, not the worker's start (the ready wait has its own
    # bound above).
    start_timeout(args.timeout, args.function)
    metadata = trigger_metadata(message)
    metadata["sys"] = sys_metadata(args.function)
    payload = {"Data": {args.binding: data_value(message)}, "Metadata": metadata}
    invocation = str(uuid.uuid4())
    connection = http.client.HTTPConnection("127.0.0.1", args.port)
    try:
        connection.request(
            "POST",
            f"/{args.function}",
            body=json.dumps(payload).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Azure-Functions-InvocationId": invocation,
                "X-Azure-Functions-HostVersion": HOST_VERSION,
                "User-Agent": f"Azure-Functions-Host/{HOST_VERSION}",
            },
        )
        response = connection.getresponse()
        status, reason, raw = response.status, response.reason, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise InvocationFailed(
            f"POST /{args.function} to the custom handler failed: {exc or type(exc).__name__}"
        ) from None
    finally:
        connection.close()
    text = raw.decode("utf-8", errors="replace")
    if not 200 <= status < 300:
        raise InvocationFailed(
            f"the custom handler answered {status} {reason} to POST /{args.function}: "
            f"{text.strip()[:2000]}"
        )
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise InvocationFailed(
            f"the custom handler answered {status} to POST /{args.function} with a body that "
            f"is not a JSON object: {text.strip()[:500]!r}"
        )
    for line in answer.get("Logs") or []:
        print(line)
    outputs = dict(answer.get("Outputs") or {})
    if "ReturnValue" in answer and answer["ReturnValue"] is not None:
        outputs["$return"] = answer["ReturnValue"]
    return succeed(outputs, declared)


# ----------------------------------------------------------------- Python apps
class Out:
    """What a ``func.Out[T]`` parameter receives (the worker's is as small)."""

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


class Context:
    """What a ``context`` parameter receives."""

    def __init__(self, function: str, directory: str) -> None:
        self.invocation_id = str(uuid.uuid4())
        self.function_name = function
        self.function_directory = directory
        self.trace_context = None
        self.retry_context = None


def _when(value: str) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def trigger_value(message: Message, binding: dict[str, Any], annotation: Any) -> Any:
    """The trigger argument in the type the function declares (see the module text)."""
    if annotation is str:
        if message.text is None:
            raise InvocationFailed("the function takes str but the message is not UTF-8")
        return message.text
    if annotation is bytes:
        return message.body
    kind = str(binding.get("type", "")).lower()
    func = importlib.import_module("azure.functions")
    if kind == "queuetrigger":
        queue = importlib.import_module("azure.functions.queue")
        meta = trigger_metadata(message)
        return queue.QueueMessage(
            id=meta.get("Id") or message.id,
            body=message.body,
            dequeue_count=message.dequeue_count,
            expiration_time=_when(str(meta.get("ExpirationTime", ""))),
            insertion_time=_when(str(meta.get("InsertionTime", ""))),
            time_next_visible=_when(str(meta.get("NextVisibleTime", ""))),
            pop_receipt=meta.get("PopReceipt"),
        )
    if kind == "kafkatrigger":
        meta = message.metadata
        return func.KafkaEvent(
            body=message.body,
            key=meta.get("key"),
            offset=_int(meta.get("offset")),
            partition=_int(meta.get("partition")),
            topic=meta.get("topic"),
        )
    if str(binding.get("dataType", "")).lower() == "binary" or message.text is None:
        return message.body
    return message.text


def load_python_function(app: Path, name: str) -> tuple[Any, list[dict[str, Any]]]:
    """(the user's function, its bindings) from a v1 folder or a v2 function_app.py."""
    sys.path.insert(0, str(app))
    folder = app / name / "function.json"
    if folder.is_file():
        config = json.loads(folder.read_text())
        script = app / name / config.get("scriptFile", "__init__.py")
        entry = config.get("entryPoint", "main")
        spec = importlib.util.spec_from_file_location(
            name if script.name == "__init__.py" else f"{name}.{script.stem}",
            script,
            submodule_search_locations=[str(script.parent)]
            if script.name == "__init__.py"
            else None,
        )
        if spec is None or spec.loader is None:
            raise InvocationFailed(f"cannot load {script}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        function = getattr(module, entry, None)
        if function is None:
            raise InvocationFailed(f"{script} has no function {entry!r} (entryPoint)")
        return function, list(config.get("bindings") or [])
    script = app / os.environ.get("PYTHON_SCRIPT_FILE_NAME", "function_app.py")
    if not script.is_file():
        raise InvocationFailed(f"{app}: neither {name}/function.json nor {script.name}")
    spec = importlib.util.spec_from_file_location(script.stem, script)
    if spec is None or spec.loader is None:
        raise InvocationFailed(f"cannot load {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[script.stem] = module
    spec.loader.exec_module(module)
    func = importlib.import_module("azure.functions")
    apps = [v for v in vars(module).values() if isinstance(v, func.FunctionRegister)]
    if len(apps) != 1:
        raise InvocationFailed(
            f"{script} must define exactly one FunctionApp at top level; found {len(apps)}"
        )
    for function in apps[0].get_functions():
        if function.get_function_name() == name:
            bindings = json.loads(function.get_function_json())["bindings"]
            return function.get_user_function(), bindings
    known = ", ".join(f.get_function_name() for f in apps[0].get_functions())
    raise InvocationFailed(f"{script} has no function {name!r} (it has: {known})")


def invoke_python(args: argparse.Namespace) -> int:
    message = Message()
    app = Path(args.app).resolve()
    declared = [o for o in (args.outputs or "").split(",") if o]
    function, bindings = load_python_function(app, args.function)
    trigger = next(
        (
            b
            for b in bindings
            if str(b.get("direction", "")).lower() == "in"
            and str(b.get("type", "")).endswith("Trigger")
        ),
        None,
    )
    if trigger is None:
        raise InvocationFailed(f"function {args.function} declares no trigger binding")
    signature = inspect.signature(function)
    outs: dict[str, Out] = {}
    kwargs: dict[str, Any] = {}
    by_name = {b.get("name"): b for b in bindings}
    for parameter in signature.parameters.values():
        binding = by_name.get(parameter.name)
        if binding is trigger:
            kwargs[parameter.name] = trigger_value(message, trigger, parameter.annotation)
        elif binding is not None and str(binding.get("direction", "")).lower() == "out":
            outs[parameter.name] = kwargs[parameter.name] = Out()
        elif (
            parameter.name == "context"
            or getattr(parameter.annotation, "__name__", "") == "Context"
        ):
            kwargs[parameter.name] = Context(args.function, str(app / args.function))
        elif parameter.default is inspect.Parameter.empty:
            raise InvocationFailed(
                f"function {args.function}: parameter {parameter.name!r} has no binding "
                "jobrunner can give (input bindings are not supported)"
            )
    start_timeout(args.timeout, args.function)
    try:
        returned = function(**kwargs)
        if inspect.isawaitable(returned):
            returned = asyncio.run(_await(returned))
    except Exception as exc:
        traceback.print_exc()
        raise InvocationFailed(
            f"function {args.function} raised {type(exc).__name__}: {exc}"
        ) from None
    outputs: dict[str, Any] = {name: out.get() for name, out in outs.items()}
    if returned is not None:
        outputs["$return"] = returned
    return succeed(outputs, declared)


async def _await(awaitable: Any) -> Any:
    return await awaitable


# ----------------------------------------------------------------- entry
def install(destination: str) -> int:
    """Copy this file to ``destination``/invoker.py (from the jobrunner image into a
    volume the function's container mounts)."""
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, target / "invoker.py")
    print(f"jobrunner-invoker: installed {target / 'invoker.py'}")
    return 0


_TIMEOUT_HELP = (
    "seconds one invocation may take (host.json functionTimeout; default: none, as with -1)"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invoker.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    handler = sub.add_parser("custom-handler", help="POST the message to a custom handler")
    handler.add_argument("--function", required=True)
    handler.add_argument(
        "--port", type=int, default=int(os.environ.get("FUNCTIONS_CUSTOMHANDLER_PORT", "8080"))
    )
    handler.add_argument("--binding", default="msg", help="the trigger binding's name")
    handler.add_argument("--outputs", default="", help="output binding names, comma-separated")
    handler.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the handler (the docs' 60 s)",
    )
    handler.add_argument("--timeout", type=float, default=None, help=_TIMEOUT_HELP)
    python = sub.add_parser("python", help="call a Python function app's function")
    python.add_argument("--app", default=os.environ.get("AzureWebJobsScriptRoot", "."))  # noqa: SIM112
    python.add_argument("--function", required=True)
    python.add_argument("--outputs", default="")
    python.add_argument("--timeout", type=float, default=None, help=_TIMEOUT_HELP)
    inst = sub.add_parser("install", help="copy this file into a directory")
    inst.add_argument("destination")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.mode == "install":
        return install(args.destination)
    try:
        if args.mode == "custom-handler":
            return invoke_custom_handler(args)
        return invoke_python(args)
    except InvocationFailed as exc:
        return fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
