"""The dispatch loop of one ScaledJob: a message arrives, becomes exactly one Job, is
tracked to its end and settled once.

``dispatcher`` is the loop that wires the phases, each a module of its own:
``intake`` (a delivery's identity, the in-flight map a redelivery joins, the refusal of
a reused message id), ``lifecycle`` (a slot, the Job created or adopted, its outcome
awaited or the message handed over), ``settlement`` (the one place a message is
settled, the finalizer released, unforeseen errors bounded), ``keptcopies`` (Jobs whose
message was acked earlier). Beside them: ``events`` (Kubernetes Events on Jobs),
``metrics`` (the dispatch series), ``limiter`` (``maxReplicaCount``), ``outputs`` (a
function's outputs, published before its message is settled) and ``scope`` (what every
phase needs). An import contract in pyproject.toml keeps that order.

It talks to brokers and to Kubernetes only through ``jobrunner.core.protocols``. Must
not import: the adapters (kube, local, sources, functions), the operator, the views,
the command line.
"""
