"""Following Jobs to their end and cleaning up after them: one watch per (namespace,
selector) that resolves each Job's outcome (``tracker``), and the history limits that
delete finished Jobs beyond ``successfulJobsHistoryLimit``/``failedJobsHistoryLimit``
(``cleanup``).

Must not import: dispatch, rendering, the adapters, the operator, the command line.
"""
