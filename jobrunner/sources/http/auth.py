"""Who may POST events to an HTTP trigger and read their status: a bearer token
compared in constant time, or a Kubernetes ServiceAccount token checked with a
TokenReview and matched against the allowed ServiceAccounts, or (``--local`` only)
anyone."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from jobrunner.core.protocols import TokenReviewer, TransientError
from jobrunner.sources.http.binding import EventRejected


@dataclass(frozen=True)
class Authenticator:
    """Who may POST and GET on one path: a bearer token, or ServiceAccounts checked by
    TokenReview, or (``--local`` only) anyone."""

    mode: str
    token: str = ""
    service_accounts: tuple[str, ...] = ()
    audience: str = ""
    reviewer: TokenReviewer | None = None

    async def check(self, authorization: str | None) -> None:
        """Return when the caller may; EventRejected 401/403 otherwise."""
        if self.mode == "none":
            return
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise EventRejected(401, "Unauthorized", "a bearer token is required")
        credential = credential.strip()
        if self.mode == "bearer":
            if not hmac.compare_digest(credential.encode(), self.token.encode()):
                raise EventRejected(401, "Unauthorized", "the token is not valid here")
            return
        if self.reviewer is None:
            raise EventRejected(503, "Unavailable", "tokens cannot be reviewed now")
        try:
            review = await self.reviewer.review_token(
                credential, audiences=(self.audience,) if self.audience else ()
            )
        except TransientError:
            raise EventRejected(503, "Unavailable", "tokens cannot be reviewed now") from None
        if not review.authenticated:
            raise EventRejected(401, "Unauthorized", "the token is not valid here")
        if not self._allowed(review.username):
            raise EventRejected(403, "Forbidden", "this ServiceAccount may not post here")

    def _allowed(self, username: str) -> bool:
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            return False
        namespace, name = parts[2], parts[3]
        return any(
            allowed in (f"{namespace}:{name}", f"{namespace}:*")
            for allowed in self.service_accounts
        )
