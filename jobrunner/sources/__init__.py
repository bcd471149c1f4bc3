"""Message sources: one module per broker behind the MessageSource protocol
(``jobrunner.core.protocols``): receive, settle (ack, dead-letter, release), keep alive.

Each module owns one broker's semantics (RabbitMQ, Kafka, SQS, Azure Storage queues,
Redis Streams, NATS JetStream, MQTT 5, the embedded SQLite queue) and is the only code
that imports that broker's client.

Must not import: another source (what two share belongs in the core), the Kubernetes
layer, the local executor, functions, the operator, the runner, the command line.
"""
