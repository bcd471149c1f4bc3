"""Azure Functions-style containers: one function invocation per message, as a Job.

This package owns the function-app import (``importer``: a function app directory ->
ScaledJob manifests), the in-Job invoker (``invoker``: standard library only, it runs
inside users' images) and the custom-handler contract the invoker speaks (``policy``:
the admission policy that confines an invoker's writes to its own Job).

It may import dispatch and below (core, manifest, rendering). Must not import: the
sources, the Kubernetes layer, the local executor, the operator; the invoker imports no
jobrunner module at all; and nothing below the runner imports this package
(import-linter contracts say so).
"""
