"""The local executor: Jobs run as processes on this machine, for development and for
trying jobrunner without a cluster. Like ``kube/``, it is reached only through the
JobClient protocol.

``client`` is the JobClient (Job records under the state directory), ``supervisor`` runs
one Job's pods as the Job controller and the kubelet would, ``compat`` says which Job
fields it honours and refuses the others, ``jobdir`` lays out a Job's directory.

Must not import: the other adapters (kube, sources, functions), the operator, the
runner, the command line.
"""
