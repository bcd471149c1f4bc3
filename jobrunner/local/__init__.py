"""The local executor: Jobs run as processes on this machine, for development and for
trying jobrunner without a cluster. Like ``kube/``, it is reached only through the
JobClient protocol."""
