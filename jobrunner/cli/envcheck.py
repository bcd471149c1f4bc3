"""Misspelt ``JOBRUNNER_*`` settings: pydantic-settings ignores a variable it does not
know, so ``JOBRUNNER_LOCAL_STATE_DIR`` (one underscore) silently leaves the default
state directory in place. Every command warns, once, of each ``JOBRUNNER_*`` variable
that is neither a setting nor one of the variables jobrunner's own scripts and Jobs use,
with the setting it most resembles.

The settings are read from the pydantic models themselves (``jobrunner.core.settings.Settings``,
prefix ``JOBRUNNER_``, groups nested with ``__``, as its ``model_config`` says), so a new
setting needs nothing here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping

from pydantic import AliasChoices, BaseModel
from pydantic_settings import BaseSettings

PREFIX = "JOBRUNNER_"
NESTING = "__"

NOT_SETTINGS = frozenset(
    {
        # What every Job gets (jobrunner.rendering.renderer) and the in-Job invoker reads
        # (jobrunner.functions.invoker): a `jobrunner` run inside a Job sees them.
        "JOBRUNNER_MESSAGE",
        "JOBRUNNER_MESSAGE_FILE",
        "JOBRUNNER_MESSAGE_ID",
        "JOBRUNNER_DELIVERY_COUNT",
        "JOBRUNNER_MESSAGE_ENCODING",
        "JOBRUNNER_MESSAGE_HEADERS",
        "JOBRUNNER_MESSAGE_METADATA",
        "JOBRUNNER_JOB_NAME",
        "JOBRUNNER_JOB_UID",
        "JOBRUNNER_SCALEDJOB",
        "JOBRUNNER_NAMESPACE",
        "JOBRUNNER_SOURCE",
        # What made the Job (jobrunner.core.provenance).
        "JOBRUNNER_TRIGGER_TYPE",
        "JOBRUNNER_TRIGGER_NAME",
        "JOBRUNNER_TRIGGER_SOURCE",
        "JOBRUNNER_TRIGGER_SOURCE_KIND",
        "JOBRUNNER_REDELIVERED",
        "JOBRUNNER_ACTIVE_DEADLINE_SECONDS",
        "JOBRUNNER_FUNCTION_KEY_FILE",
        "JOBRUNNER_SERVICE_ACCOUNT_DIR",
        # The local executor's, to a Job's processes and its supervisor
        # (jobrunner.local.supervisor).
        "JOBRUNNER_LOCAL",
        "JOBRUNNER_LOCAL_JOB_DIR",
        "JOBRUNNER_LOCAL_RETRY_SECONDS",
        # The local stack's scripts (deploy/local/*.sh, demo.py).
        "JOBRUNNER_CACHE",
        "JOBRUNNER_STATE",
    }
)
NOT_SETTINGS_PREFIXES = (
    "JOBRUNNER_TEST_",  # the test suite's services (tests/, deploy/local/stack.env)
    "JOBRUNNER_STACK_",  # the local stack's scripts (JOBRUNNER_STACK_ENV, ..._WRITE_ENV)
)


def setting_names(model: type[BaseModel], prefix: str = PREFIX) -> Iterator[str]:
    """Every environment variable that sets a field of ``model``: a group's own name
    (its value given as JSON) and each of its fields', and a field's aliases."""
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            yield from (c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            yield alias.upper()
        if alias is not None and prefix == PREFIX:
            continue  # a root field named only by its aliases
        full = f"{prefix}{name}".upper()
        yield full
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from setting_names(kind, full + NESTING)


def misspelt(environ: Mapping[str, str], settings: type[BaseSettings]) -> list[str]:
    """One warning per ``JOBRUNNER_*`` variable of ``environ`` that nothing reads, with
    a did-you-mean when a setting's name is close; sorted by variable."""
    known = set(setting_names(settings))
    out = []
    for variable in sorted(environ):
        upper = variable.upper()  # pydantic-settings reads names in any case
        if not upper.startswith(PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        if upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        # Compared without the prefix, which every name shares and which would make any
        # two names look alike.
        names = {k.removeprefix(PREFIX): k for k in known if k.startswith(PREFIX)}
        close = difflib.get_close_matches(upper.removeprefix(PREFIX), list(names), n=1, cutoff=0.7)
        hint = (
            f"; did you mean {names[close[0]]}?"
            if close
            else " (the settings are the fields of jobrunner/core/settings.py's Settings)"
        )
        out.append(f"{variable} is not a jobrunner setting and is ignored{hint}")
    return out


def warn_misspelt() -> None:
    """Warn (stderr) of each misspelt ``JOBRUNNER_*`` variable of this process."""
    import os

    from jobrunner.cli.errors import warn
    from jobrunner.core.settings import Settings

    for problem in misspelt(os.environ, Settings):
        warn(problem)
