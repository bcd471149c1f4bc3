"""RabbitMQ's rules for a queue's delivery limit, for both broker generations
(rabbit_quorum_queue.erl: gather_policy_config, resolve_delivery_limit): the stack runs
3.x, so 4.x's default of 20 is checked here, from the answers a 4.x management API gives."""

from __future__ import annotations

from typing import Any

import pytest

from jobrunner.sources.rabbitmq import RABBITMQ_4_DELIVERY_LIMIT, delivery_limit

ROWS: list[tuple[str, dict[str, Any], int | None]] = [
    ("3.x quorum queue, none set: unlimited", {"version": "3.13.7"}, None),
    ("4.x quorum queue, none set: 20", {"version": "4.0.5"}, RABBITMQ_4_DELIVERY_LIMIT),
    ("4.x reports its limit", {"version": "4.1.0", "reported": 20}, 20),
    ("4.x reports unlimited", {"version": "4.1.0", "reported": "unlimited"}, None),
    ("unknown version: 4.x's default assumed", {"version": ""}, RABBITMQ_4_DELIVERY_LIMIT),
    ("the argument", {"version": "3.10.8", "argument": 5}, 5),
    ("a policy's digit string", {"version": "4.0.5", "policy": "7"}, 7),
    ("the smaller of argument and policy", {"version": "4.0.5", "argument": 5, "policy": 3}, 3),
    ("4.x: -1 turns it off", {"version": "4.0.5", "argument": -1}, None),
    ("a negative one loses to a limit", {"version": "4.0.5", "argument": -1, "policy": 4}, 4),
    ("0 is a limit", {"version": "3.10.8", "argument": 0}, 0),
    ("a boolean is no limit", {"version": "3.10.8", "argument": True}, None),
]


@pytest.mark.parametrize(("given", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_a_quorum_queue_s_delivery_limit(given: dict[str, Any], expected: int | None) -> None:
    assert delivery_limit(queue_type="quorum", **given) == expected


@pytest.mark.parametrize("queue_type", ["classic", "stream"])
def test_only_quorum_queues_have_one(queue_type: str) -> None:
    assert delivery_limit(queue_type=queue_type, version="4.0.5", argument=5) is None
