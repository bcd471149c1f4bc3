"""What a ScaledJob's triggers may use of the dispatcher's own process: its environment
variables (KEDA's ``*FromEnv`` keys and TriggerAuthentication ``env``) and its own cloud
identity (the AWS SDK's default credential chain).

KEDA reads those variables from the scale target's container (for a ScaledJob, a
container of its Job template: ``envSourceContainerName``), never from the KEDA
operator's own environment. A jobrunner dispatcher started with ``jobrunner run -f`` *is*
that container: its environment and identity belong to the manifest's author, so
everything is reachable (``Reach.own``). ``jobrunner operator`` serves ScaledJobs written
by tenants in many namespaces, while its own environment holds what the chart's owner
gave it (broker credentials, cloud keys, tokens): a tenant reaches only the variables the
owner allow-lists and the operator's identity only where the owner opts in
(``Reach.for_tenants``). Only the command line reads ``os.environ``; it hands a Reach
to the runner or the operator, and triggers read nothing else.

A refusal names the variable (the tenant wrote that name) and never its value, nor
whether it is set: the text is the same either way, so it is no oracle either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from jobrunner.manifest.scaledjob import ManifestError

ENV_ALLOW_LIST_SETTING = (
    "the operator setting tenant_env_allow_list: JOBRUNNER_OPERATOR__TENANT_ENV_ALLOW_LIST, "
    "chart value tenantEnvAllowList"
)
OPERATOR_IDENTITY_SETTING = (
    "the operator setting allow_operator_identity: JOBRUNNER_OPERATOR__ALLOW_OPERATOR_IDENTITY, "
    "chart value allowOperatorIdentity"
)


@dataclass(frozen=True)
class Reach:
    """What of the dispatcher's process a trigger may use. The default reaches nothing:
    a tenant's ScaledJob under an operator whose owner allowed nothing."""

    env: Mapping[str, str] = field(default_factory=dict)
    """The variables that may be read, with their values (a copy made at start)."""
    tenant: bool = True
    """Operator mode: the ScaledJob's author is not the owner of this process. A
    variable outside ``allowed`` is refused, the embedded queue is refused, and cloud
    credentials must come with the ScaledJob unless ``operator_identity``."""
    allowed: frozenset[str] = frozenset()
    """Operator mode: the names a tenant may read (set or not)."""
    operator_identity: bool = False
    """Whether a trigger without credentials may use this process's own cloud identity
    (SQS's ``identityOwner: operator``). Always so in file mode: it is the user's own."""

    @classmethod
    def own(cls, environ: Mapping[str, str]) -> Reach:
        """File mode (``jobrunner run``): the whole environment and identity are the
        manifest author's own."""
        return cls(env=dict(environ), tenant=False, operator_identity=True)

    @classmethod
    def for_tenants(
        cls,
        environ: Mapping[str, str],
        *,
        allow_env: Iterable[str] = (),
        operator_identity: bool = False,
    ) -> Reach:
        """Operator mode: only the variables of ``allow_env`` (names the chart's owner
        lists) are copied out of ``environ``; nothing else of it is kept."""
        names = frozenset(allow_env)
        return cls(
            env={name: environ[name] for name in names if name in environ},
            tenant=True,
            allowed=names,
            operator_identity=operator_identity,
        )

    def may_read(self, name: str) -> bool:
        return not self.tenant or name in self.allowed

    def refusal(self, name: str, *, namespace: str, parameter: str) -> str:
        """Why a tenant may not read ``$name``, and what to do instead (``parameter``:
        the TriggerAuthentication parameter that gives the same value)."""
        return (
            f"${name} would be read from the operator's own environment, which a "
            "ScaledJob may not read (KEDA reads a container of the Job, and the operator's "
            "environment holds the operator's credentials); put the value in a Secret of "
            f"namespace {namespace} and pass it with a TriggerAuthentication secretTargetRef "
            f"(parameter: {parameter}), or ask the operator's owner to allow-list the "
            f"variable ({ENV_ALLOW_LIST_SETTING})"
        )

    def read(
        self, name: str, *, where: str, field_path: str, namespace: str, parameter: str
    ) -> str | None:
        """The value of ``$name`` (None when unset). ManifestError at ``where``/``field``
        when a tenant may not read it; the value is not even looked at then."""
        if not self.may_read(name):
            raise ManifestError(
                f"{where}: field {field_path}: "
                + self.refusal(name, namespace=namespace, parameter=parameter)
            )
        return self.env.get(name)

    def unset(self, name: str) -> str:
        """The words for a readable variable that is not set."""
        whose = "the operator's" if self.tenant else "the dispatcher's"
        return f"${name} is not set in {whose} environment"
