"""Operator mode: ScaledJobs as custom resources, served by one dispatch unit each.

What it owns:

* ``resources``  the custom resources' names, their parsing into what a replica wants to
                 serve (a ScaledJob, paused, invalid with the field named), the bucket
                 of each;
* ``crd``        the CustomResourceDefinitions, generated from the same pydantic models
                 that load manifest files (``deploy/crds/`` is written from it, and a test
                 keeps them equal);
* ``informer``   list-then-watch of one collection into a local store (re-list on 410);
* ``jobwatch``   one Job list+watch per namespace shared by every unit of the replica;
* ``registry``   the units by (namespace, name): desired against running, stop before
                 start, limits applied live, a failed unit restarted with backoff;
* ``leases``     who may act on what: a Lease per hashed bucket and one per replica,
                 fair share by live replicas, release on exit;
* ``status``     conditions (``Ready``, ``Active``, ``Paused``) and Events;
* ``operator``   wires them: watches -> wanted -> registry, status, leases, probes.

What it may import: the runner's ``DispatchUnit`` and the packages below it (core,
manifest, rendering, dispatch, tracking, observability) and nothing of the adapters
but through protocols: the Kubernetes objects it reads and writes go through
``api.ObjectClient`` (``jobrunner.kube.objects`` in production,
``jobrunner.testing.MemoryObjects`` in unit tests). Only the command line
(``jobrunner.cli.operator``) builds the real clients.

Must not import: the adapters (kube, local, sources, functions: import-linter), file
mode, the command line.
"""
