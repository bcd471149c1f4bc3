"""The Jinja2 side of rendering: the sandboxed environment, what a template sees, and the
evaluation of one Job template's strings under the output limit.

Shared by the dispatcher's process (which parses and checks templates at start, and
renders in-process for ``jobrunner render``) and the render workers (which render for
the dispatcher). Standard library and jinja2 only: see the package docstring.

What the environment adds to Jinja2's ``SandboxedEnvironment`` (which already keeps a
template from Python's internals and bounds ``range`` to 100,000 items):

* no constant folding: Jinja2 otherwise evaluates constant expressions, filters
  included, while *compiling* (and while listing a template's names), so
  ``{{ 'x'|center(10**9) }}`` or ``{{ '%999999999d' % 1 }}`` would run at start-up in
  the dispatcher's own process, outside any limit. Its optimizer is off
  (``optimized=False``), and since the compiler still folds what an output holds,
  every filter and test takes the render context (never folded) and every binary
  operator is intercepted (never folded);
* ``*`` and ``**`` are checked before they run: a string, list or tuple repeated past
  the output limit, or a power past 65,536 bits, is a ``TemplateError`` at once
  (without the check each is a single C call that only the memory limit stops);
* the output of one render is counted while it streams (``Strings.render``) and stops
  at the output limit.

Everything else a template can make big (``'{:>999999999}'.format(1)``,
``'x'.center(10**9)``, a list grown in a loop) is stopped by the worker's memory limit,
and anything slow by its time limit (see ``worker``): those are the bounds that hold
whatever the template does; the checks here only make the common cases cheap and the
error precise.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jinja2
import jinja2.sandbox

TEMPLATE_NAMES = ("message", "job", "scaledjob")
"""The names a template sees."""

POWER_BITS_MAX = 65536
"""The largest result of ``**`` a template may compute, in bits (about 19,700 decimal
digits; Python refuses to print an int of more than 4,300 digits anyway)."""


class RenderError(Exception):
    """A message that cannot become a Job. ``reason`` is a short CamelCase code used in
    dead-letter headers; the text says what went wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RenderLimits:
    """What one render may cost (``DispatcherSettings.render_*``). Each error names the
    setting, so the person who can change it knows which."""

    seconds: float = 2.0
    """Wall time of one render (all the templated strings of one Job)."""
    output_bytes: int = 1024 * 1024
    """Characters the templates of one Job may output in all."""
    memory_bytes: int = 96 * 1024 * 1024
    """Address space of a render worker (``RLIMIT_AS``)."""

    def too_slow(self) -> str:
        return (
            f"rendering took longer than {self.seconds:g} s, the time one message's Job may "
            "take to render (JOBRUNNER_DISPATCHER__RENDER_TIMEOUT_SECONDS, at most 60); "
            "the template loops too long for this message"
        )

    def too_much_output(self) -> str:
        return (
            f"the template made more than {self.output_bytes} bytes of output, the most one "
            "message's Job may have (JOBRUNNER_DISPATCHER__RENDER_OUTPUT_BYTES)"
        )

    def too_much_memory(self) -> str:
        return (
            f"rendering needed more than {self.memory_bytes // (1024 * 1024)} MiB of memory, "
            "the most a render may use (JOBRUNNER_DISPATCHER__RENDER_MEMORY_BYTES)"
        )


class Deadline(BaseException):
    """Raised into a render when its time is up (by the worker's timer signal). A
    BaseException, so no ``except Exception`` inside Jinja2 or a filter swallows it."""


class MessageView:
    """What a template sees as ``message``. ``json`` parses the body on first use."""

    def __init__(
        self,
        *,
        body: bytes,
        id: str | None,
        identity: str,
        headers: Mapping[str, str],
        metadata: Mapping[str, str],
        source: str,
        content_type: str | None,
    ) -> None:
        self._raw = body
        self.id = id
        self.identity = identity
        self.headers = dict(headers)
        self.metadata = dict(metadata)
        self.source = source
        self.content_type = content_type
        self.size = len(body)

    @cached_property
    def body(self) -> str:
        return self._raw.decode("utf-8", errors="replace")

    @cached_property
    def json(self) -> Any:
        try:
            return json.loads(self._raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise RenderError(
                "InvalidMessage",
                f"the template reads message.json but the body is not JSON ({exc})",
            ) from None


def b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def literal(text: str) -> str:
    """``text`` as a value the kubelet's ``$(VAR)`` expansion leaves unchanged."""
    return text.replace("$", "$$")


def _at_runtime(func: Any) -> Any:
    """``func`` (a filter or test) as one that takes the render context, which Jinja2
    never evaluates while compiling: with constant arguments it would otherwise run
    in whichever process compiles the template (``_FilterTestCommon.as_const``)."""
    passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    if passes == "context":
        return func

    @jinja2.pass_context
    def call(context: jinja2.runtime.Context, *args: Any, **kwargs: Any) -> Any:
        if passes == "eval_context":
            return func(context.eval_ctx, *args, **kwargs)
        if passes == "environment":
            return func(context.environment, *args, **kwargs)
        return func(*args, **kwargs)

    return call


class _Sandbox(jinja2.sandbox.SandboxedEnvironment):
    # Every binary operator is intercepted: an intercepted one is also never folded
    # while compiling (BinExpr.as_const), and '*' and '**' are checked (call_binop).
    intercepted_binops = frozenset(jinja2.sandbox.SandboxedEnvironment.default_binop_table)

    def __init__(self, *, output_limit: int, **options: Any) -> None:
        super().__init__(**options)
        self.output_limit = output_limit

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and abs(left) > 1
            and (abs(left).bit_length() - 1) * right > POWER_BITS_MAX
        ):
            raise RenderError(
                "TemplateError",
                f"a {abs(left).bit_length()}-bit number to the power {right} is over the "
                f"{POWER_BITS_MAX} bits a template may compute",
            )
        return self.binop_table[operator](left, right)

    def _check_repeat(self, sequence: Any, count: Any) -> None:
        if isinstance(sequence, str | list | tuple) and isinstance(count, int):
            size = len(sequence) * count
            if size > self.output_limit:
                raise RenderError(
                    "TemplateError",
                    f"'*' would make a {type(sequence).__name__} of {size} items (length "
                    f"{len(sequence)} x {count}), over the {self.output_limit} a render may "
                    "output (JOBRUNNER_DISPATCHER__RENDER_OUTPUT_BYTES)",
                )


def environment(
    *, kubelet_expanded: bool, output_limit: int = RenderLimits.output_bytes
) -> jinja2.sandbox.SandboxedEnvironment:
    """The Jinja2 environment for one kind of field. In a field the kubelet expands,
    every expression's output is escaped (``finalize`` runs on each ``{{ }}`` result,
    never on the template's own text)."""
    finalize: Callable[[Any], Any] | None = None
    if kubelet_expanded:

        def finalize(value: Any) -> Any:
            return literal(value if isinstance(value, str) else str(value))

    env = _Sandbox(
        output_limit=output_limit,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        finalize=finalize,
        optimized=False,
    )
    env.filters["b64encode"] = b64
    env.filters["tojson"] = lambda v: json.dumps(v, sort_keys=True)
    env.filters = {name: _at_runtime(f) for name, f in env.filters.items()}
    env.tests = {name: _at_runtime(t) for name, t in env.tests.items()}
    return env


class StringFailure(Exception):
    """The string at ``index`` of a ``Strings`` could not be rendered: ``reason`` (a
    dead-letter code) and ``detail``, without the field's name (the caller knows it).
    ``index`` None: no one string is to blame (the worker died, or timed out)."""

    def __init__(self, index: int | None, reason: str, detail: str) -> None:
        super().__init__(index, reason, detail)
        self.index = index
        self.reason = reason
        self.detail = detail


class Strings:
    """The templated strings of one Job template, compiled, in a fixed order: each a
    source and whether the kubelet expands its field (then each expression's output is
    escaped, see ``environment``). The sources were checked when the template was
    loaded (``rendering``): a syntax error here is a bug."""

    def __init__(self, sources: Sequence[tuple[str, bool]], *, limits: RenderLimits) -> None:
        self.limits = limits
        envs = {
            escape: environment(kubelet_expanded=escape, output_limit=limits.output_bytes)
            for escape in (False, True)
        }
        self._templates = [envs[escape].from_string(source) for source, escape in sources]

    def __len__(self) -> int:
        return len(self._templates)

    def render(self, context: Mapping[str, Any]) -> list[str]:
        """Every string rendered with ``context``; StringFailure naming the first that
        fails, or the limit passed (output here; time when the caller raises Deadline
        into it; memory when an allocation fails)."""
        left = self.limits.output_bytes
        values: list[str] = []
        for index, template in enumerate(self._templates):
            parts: list[str] = []
            try:
                for chunk in template.generate(context):
                    left -= len(chunk)
                    if left < 0:
                        raise StringFailure(index, "TemplateError", self.limits.too_much_output())
                    parts.append(chunk)
            except StringFailure:
                raise
            except Deadline:
                raise StringFailure(index, "TemplateError", self.limits.too_slow()) from None
            except MemoryError:
                parts.clear()
                raise StringFailure(index, "TemplateError", self.limits.too_much_memory()) from None
            except RecursionError:
                raise StringFailure(
                    index, "TemplateError", "recursion too deep (a macro that calls itself?)"
                ) from None
            except RenderError as exc:
                raise StringFailure(index, exc.reason, exc.detail) from None
            except jinja2.UndefinedError as exc:
                raise StringFailure(index, "TemplateError", str(exc.message)) from None
            except jinja2.exceptions.SecurityError as exc:
                raise StringFailure(index, "TemplateError", f"blocked: {exc}") from None
            except Exception as exc:
                raise StringFailure(
                    index, "TemplateError", f"{type(exc).__name__}: {exc}"
                ) from None
            values.append("".join(parts))
        return values
