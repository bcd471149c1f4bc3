"""The ScaledJob-style manifest: everything a ScaledJob's author writes, read and checked
before any I/O.

A message's path starts here: a file or a custom resource becomes a ``ScaledJob``
(``scaledjob``: the models and their errors; ``loader``: YAML/JSON read strictly, each
mistake named by file, line and field), its trigger is checked and resolved against its
TriggerAuthentication (``triggers/``, one module per trigger type, ``triggers.auth``,
``triggers.reach`` for what a tenant may read), and its Job template is checked against
the API server's batch/v1 schema (``jobschema``).

Inside: loader > triggers > scaledjob, jobschema. Must not import: anything but
``jobrunner.core``.
"""
