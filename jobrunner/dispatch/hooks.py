"""Several settle hooks asked in turn, as one (``SettleHook``): a function's outputs
first (they may turn a success into ``FunctionFailed``), then the reply to the producer
(which then tells the outcome the message is settled with).

Imports, of the dispatch modules, none."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jobrunner.core.models import Decision
from jobrunner.core.protocols import SettleHook


class SettleHooks:
    """Each hook gets the decision the one before it returned."""

    def __init__(self, hooks: Sequence[SettleHook]) -> None:
        self.hooks = tuple(hooks)

    async def before_settle(
        self, decision: Decision, *, live: bool = False, message: Mapping[str, Any] | None = None
    ) -> Decision:
        for hook in self.hooks:
            decision = await hook.before_settle(decision, live=live, message=message)
        return decision


def chain(*hooks: SettleHook | None) -> SettleHook | None:
    """The hooks given (None left out) as one; None when there are none."""
    present = [h for h in hooks if h is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else SettleHooks(present)
