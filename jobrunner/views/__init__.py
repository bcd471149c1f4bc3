"""What a person asks of a running system, behind the CLI: ``queries`` (publish to the
embedded queue; what ``status``, ``jobs`` and ``logs`` show, read through the same
JobClient the dispatcher uses), ``console`` (the tables), ``finalizers`` (see and
remove jobrunner's finalizer by hand).

Must not import: the command line, file mode.
"""
