"""The dispatch loop of one ScaledJob: a message arrives, becomes exactly one Job, is
tracked to its end and settled once.

``dispatcher`` is the loop that wires the phases; ``limiter`` holds
``maxReplicaCount``; ``outputs`` publishes a function's outputs before its message is
settled. It talks to brokers and to Kubernetes only through ``jobrunner.core.protocols``.

Must not import: the adapters (kube, local, sources, functions), the operator, the views,
the command line.
"""
