"""The admission policy that narrows a function's pod to its own Job.

The invoker's Role grants ``patch`` on ``jobs``: RBAC has no way to say "the Job this pod
belongs to". A ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1, GA since
Kubernetes 1.30; CEL, no webhook to run) says it at admission: a request made with a
ServiceAccount token bound to a pod (the token every pod gets; the API server then puts
``authentication.kubernetes.io/pod-name`` and ``pod-uid`` in the user's ``extra``,
apiserver pkg/authentication/serviceaccount/util.go) may update one of jobrunner's Jobs
only if

* the Job is that pod's: the Job controller names a Job's pods ``<job>-<5 characters>``
  (``generateName: <job>-``; names are cut only past 58 characters, and jobrunner's Job
  names have at most 57), and no other Job's pods can have a name of that length with
  that start. CEL cannot read the pod, so its ``batch.kubernetes.io/job-name`` label
  cannot be checked; whoever can create pods named like another Job's can also mount that
  Job's Secret, so the namespace stays the boundary for pod creators;
* only the function's result changes: the annotations ``jobrunner.dev/function-result``
  and ``-mac`` (jobrunner.core.marks.POD_WRITABLE); every other annotation, the labels, the
  finalizers, the owners and the spec stay as they were (``object`` against
  ``oldObject``).

Two matches use the same rules: the chart's (deploy/helm/jobrunner/templates/
invoker-policy.yaml, on by default) applies to every pod-bound token except the
operator's own and the ones its values exempt; the one ``functions import`` writes
(``<app>-policy.yaml``, for clusters without the chart) to the app's invoker
ServiceAccount alone, so it can never stand in the way of a dispatcher running in a pod.
A unit test checks that the chart's rules are these.
"""

from __future__ import annotations

import json
from typing import Any

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
RESULT_KEYS = ("jobrunner.dev/function-result", "jobrunner.dev/function-result-mac")
"""jobrunner.core.marks.POD_WRITABLE (a test checks it)."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "jobrunner"}


def _or_empty(path: str, empty: str) -> str:
    parent, _, field = path.rpartition(".")
    return f"has({parent}.{field}) ? {path} : {empty}"


VARIABLES: list[dict[str, str]] = [
    {
        "name": "podName",
        "expression": (
            f"has(request.userInfo.extra) && '{POD_NAME_EXTRA}' in request.userInfo.extra"
            f" && size(request.userInfo.extra['{POD_NAME_EXTRA}']) == 1"
            f" ? request.userInfo.extra['{POD_NAME_EXTRA}'][0] : ''"
        ),
    },
    {"name": "resultKeys", "expression": json.dumps(list(RESULT_KEYS))},
    {"name": "newAnnotations", "expression": _or_empty("object.metadata.annotations", "{}")},
    {"name": "oldAnnotations", "expression": _or_empty("oldObject.metadata.annotations", "{}")},
]
"""CEL variables of the policy (each evaluated once per request)."""

VALIDATIONS: list[dict[str, str]] = [
    {
        "expression": (
            "variables.podName.startsWith(object.metadata.name + '-')"
            " && size(variables.podName) == size(object.metadata.name) + 6"
        ),
        "messageExpression": (
            "variables.podName == ''"
            " ? 'this ServiceAccount may change only the Job of the pod its token is bound"
            " to, and this token is bound to no pod'"
            " : 'pod ' + variables.podName + ' may change only its own Job, not Job '"
            " + object.metadata.name"
        ),
        "reason": "Forbidden",
    },
    {
        "expression": (
            "variables.newAnnotations.all(k, k in variables.resultKeys"
            " || (k in variables.oldAnnotations"
            " && variables.oldAnnotations[k] == variables.newAnnotations[k]))"
            " && variables.oldAnnotations.all(k, k in variables.resultKeys"
            " || k in variables.newAnnotations)"
        ),
        "message": (
            "a function's pod may change only the annotations jobrunner.dev/function-result"
            " and jobrunner.dev/function-result-mac of its Job"
        ),
        "reason": "Forbidden",
    },
    {
        "expression": (
            "object.spec == oldObject.spec"
            f" && ({_or_empty('object.metadata.labels', '{}')})"
            f" == ({_or_empty('oldObject.metadata.labels', '{}')})"
            f" && ({_or_empty('object.metadata.finalizers', '[]')})"
            f" == ({_or_empty('oldObject.metadata.finalizers', '[]')})"
            f" && ({_or_empty('object.metadata.ownerReferences', '[]')})"
            f" == ({_or_empty('oldObject.metadata.ownerReferences', '[]')})"
        ),
        "message": "a function's pod may not change its Job's spec, labels, finalizers or owners",
        "reason": "Forbidden",
    },
]
"""The rules; the chart's template holds the same (a test compares them)."""


def policy(
    *, name: str, match_conditions: list[dict[str, str]], namespaces: list[str] | None
) -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy ``name`` and its binding (both cluster-scoped):
    jobrunner's Jobs (``app.kubernetes.io/managed-by: jobrunner``, old or new), updates
    matching ``match_conditions``, in ``namespaces`` (None: all)."""
    binding: dict[str, Any] = {"policyName": name, "validationActions": ["Deny"]}
    if namespaces:
        binding["matchResources"] = {
            "namespaceSelector": {
                "matchExpressions": [
                    {
                        "key": "kubernetes.io/metadata.name",
                        "operator": "In",
                        "values": list(namespaces),
                    }
                ]
            }
        }
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["batch"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["jobs"],
                        }
                    ],
                    "objectSelector": {"matchLabels": dict(MANAGED_BY)},
                },
                "matchConditions": match_conditions,
                "variables": VARIABLES,
                "validations": VALIDATIONS,
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": binding,
        },
    ]


def invoker_policy(app: str, namespace: str | None) -> list[dict[str, Any]]:
    """What ``functions import`` writes: the rules for the app's invoker ServiceAccount
    (``<app>-invoker``; in ``namespace`` when given, else in any namespace)."""
    account = f"{app}-invoker"
    if namespace:
        user = f"request.userInfo.username == 'system:serviceaccount:{namespace}:{account}'"
    else:
        user = (
            "request.userInfo.username.startsWith('system:serviceaccount:')"
            f" && request.userInfo.username.endsWith(':{account}')"
        )
    return policy(
        name=invoker_policy_name(app, namespace),
        match_conditions=[{"name": "the-invoker-service-account", "expression": user}],
        namespaces=[namespace] if namespace else None,
    )


def invoker_policy_name(app: str, namespace: str | None) -> str:
    """The cluster-scoped name of ``app``'s policy: ``jobrunner-invoker.<namespace>.<app>``
    (or ``jobrunner-invoker.<app>``). App and namespace are DNS labels, which hold no
    ``.``, so no two (app, namespace) pairs share a name (joined with ``-``, app ``a-b``
    in namespace ``c`` and app ``a`` in namespace ``b-c`` did: applying one replaced the
    other's policy and left its invoker unconfined). At most 4 + 63 + 24 characters of
    the 253 a DNS subdomain may have."""
    return ".".join(["jobrunner-invoker", *([namespace] if namespace else []), app])
