"""The Kubernetes adapter: the only code that imports the kubernetes client.

``client`` is the JobClient (Jobs, their message Secrets, Events, the Job watch, pod
logs) and ``objects`` the operator's ObjectClient (custom resources, Leases, status), both
behind the protocols of ``jobrunner.core.protocols`` and ``jobrunner.operator.api``.

Must not import: the other adapters (local, sources, functions), the operator, the
runner, the command line.
"""
