"""The HTTP trigger: events POSTed to the dispatcher (the CloudEvents HTTP protocol
binding, binary or structured mode, or a plain body), each one Job.

There is no broker, so the Job is the event's durable copy (as Knative's JobSink keeps
it): a POST is answered only once its Job (and its message Secret) exists, or once it is
clear that it never will:

* ``202 Accepted`` with ``Location: <path>/<event id>``: the Job exists. The same event
  again (the CloudEvents identity, ``source`` + ``id``; or an ``Idempotency-Key``; or the
  body's digest) is the same Job, however often and however concurrently it comes (its
  name is derived from the identity, and a second delivery in hand joins the first);
* ``GET <path>/<event id>``: ``202`` while its Job waits or runs, ``200`` with the
  outcome once it succeeded, ``400`` with the reason once it failed (JobSink's codes),
  ``404`` when no Job of that event is known (never made, or cleaned up);
* ``413`` past ``spec.messageDelivery.maxMessageBytes``; ``429`` with ``Retry-After``
  when ``maxPendingRequests`` events already wait for their Job (every slot under
  ``maxReplicaCount`` is taken); ``408`` for a body slower than ``bodyTimeoutSeconds``;
  ``503`` with ``Retry-After`` while the dispatcher stops or an error nobody foresaw
  released the event (a retry is safe: it finds the same Job); ``400``/``409``/``422``
  for an event that can never become a Job (malformed, its id reused for another body,
  refused by the template or the API server), with the reason;
* ``401``/``403`` before anything else is read: a bearer token compared in constant
  time, or a ServiceAccount token checked by a Kubernetes TokenReview and matched
  against the allowed ServiceAccounts.

A Job that fails after its ``202`` is dead-lettered from the copy it keeps (ack policy
``onJobCreation``): POSTed to ``spec.deadLetter.url`` as a structured CloudEvent with
the reason, retried until the sink answers 2xx (the Job's finalizer holds it meanwhile).

One aiohttp server per listen address is shared by every HTTP trigger of the process
(the operator serves all its ScaledJobs on one Service); each trigger owns its path.
Why aiohttp: asyncio-native (the dispatcher's loop serves it), already in the dependency
tree through aiobotocore, with bounded request lines and headers; its keep-alive timeout
also closes a connection that never completes a request (a slow client).

Why not the ``cloudevents`` SDK for parsing: the binding is a few header and JSON rules
that jobrunner must bound itself (sizes, which headers reach the Job); the tests check
this parser against the SDK's own ``to_binary``/``to_structured``.

Must not import: another source, the Kubernetes layer, the local executor, functions,
the operator, the runner, the command line (the Job status reader and the
TokenReviewer come in through ``protocols.AnswersSenders``).
"""

from __future__ import annotations

from jobrunner.core.settings import Executor, Settings
from jobrunner.manifest.scaledjob import ManifestError, ScaledJob
from jobrunner.manifest.triggers.http import HttpTrigger
from jobrunner.sources.http.source import HttpSource

__all__ = ["HttpSource", "open_source"]


def open_source(trigger: HttpTrigger, *, scaledjob: ScaledJob, settings: Settings) -> HttpSource:
    """The source for a resolved ``http`` trigger (see jobrunner.manifest.triggers.http).
    Outside ``--local`` an unauthenticated trigger is refused."""
    local = settings.executor is Executor.LOCAL
    if trigger.auth == "none" and not local:
        raise ManifestError(
            f"ScaledJob {scaledjob.name}: field spec.triggers[0].metadata.auth: the http "
            "trigger needs authentication outside --local: give a TriggerAuthentication "
            "with a token parameter (a Secret), or metadata auth: tokenReview"
        )
    address = trigger.listen_address or (
        settings.http.local_listen_address if local else settings.http.listen_address
    )
    if trigger.tenant:
        address = settings.http.listen_address
    return HttpSource(
        trigger,
        scaledjob=scaledjob,
        address=address,
        max_body=scaledjob.spec.messageDelivery.maxMessageBytes,
    )
