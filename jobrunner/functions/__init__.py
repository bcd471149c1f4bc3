"""Azure Functions-style containers: one function invocation per message, as a Job.

This package owns the function-app import (``importer``: a function app directory ->
ScaledJob manifests), the in-Job invoker (``invoker``: standard library only, it runs
inside users' images) and the custom-handler contract the invoker speaks. It may import
the core (config, triggers, models) but never the sources, the Kubernetes layer or the
local executor, and the core never imports it (an import-linter contract says so).
"""
