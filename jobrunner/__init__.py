"""jobrunner: one message becomes exactly one Kubernetes Job, tracked to its end."""

__version__ = "0.1.0"
