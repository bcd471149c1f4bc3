"""The shared vocabulary every other package speaks; it imports no other jobrunner package.

What a message and a Job are (``models``), the two protocols the dispatch loop depends on
(``protocols``: MessageSource, JobClient, and the errors they raise), how a message maps
to its Job's name (``naming``), the platform's limits with their sources (``limits``),
names as API path segments (``apipath``), authenticated marks on Jobs (``marks``),
jobrunner's own ``JOBRUNNER_*`` settings (``settings``), what may be said about the outside
world (``redaction``), timestamps, private files, named tasks, fault points for the
crash tests, and dead letters as an operator sees them.

Must not import: any other jobrunner package (import-linter's layers contract).
"""
