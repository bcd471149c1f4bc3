"""From a message to the Job that carries it: the message view a template sees, the
rendered Job (name, labels, placement of the message in env, a file or a Secret), the
message Secret's rules (``messagesecret``), and the bounded render itself (``sandbox/``:
worker processes with time, output and memory limits).

Must not import: dispatch, the adapters (kube, local, sources, functions), the operator,
the command line. The sandbox imports nothing of jobrunner but itself.
"""
