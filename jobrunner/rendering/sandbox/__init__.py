"""Bounded template rendering: what a template may cost, and the worker processes that
enforce it.

A ScaledJob's author writes Jinja2 templates, and whoever publishes a message chooses
what they are fed; both are hostile (issue #20). Jinja2's sandbox keeps a template from
reaching Python's internals, but not from running forever or filling memory, and the
dispatcher's event loop is shared by every ScaledJob of the process (their Lease
renewals, /healthz, their Job watches). So the dispatcher renders in worker processes
(``pool``): each render has a time limit (the worker is killed past it), an output
limit (counted while the output streams) and a memory limit (``RLIMIT_AS`` of the
worker), and each ScaledJob may hold only its share of the workers. The figures that
chose this design are in bench/bench_render.py.

Modules:

* ``templates``: the Jinja2 environment, what a template sees (``MessageView``) and the
  evaluation of one Job template's strings under the output limit. Used in both
  processes (the dispatcher parses and checks templates at start; ``jobrunner render``
  renders in-process);
* ``worker``: the worker process's main loop (imports ``templates`` and the standard
  library only, so it starts fast and holds none of the dispatcher's settings);
* ``pool``: the dispatcher's side: starts, feeds, times and kills the workers.

What it may import: the standard library and jinja2. Must not import: anything of
jobrunner outside this package (the worker must not load the dispatcher's settings or
clients).
"""

from jobrunner.rendering.sandbox.templates import (
    TEMPLATE_NAMES,
    MessageView,
    RenderError,
    RenderLimits,
    StringFailure,
    Strings,
    environment,
    literal,
)

__all__ = [
    "TEMPLATE_NAMES",
    "MessageView",
    "RenderError",
    "RenderLimits",
    "StringFailure",
    "Strings",
    "environment",
    "literal",
]
