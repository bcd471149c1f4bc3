"""Where a failed event goes: POSTed to ``spec.deadLetter.url`` as a structured
CloudEvent (jobrunner.sources.http.binding.dead_letter_event), retried with backoff
until the sink answers 2xx. Only the status code of an answer is ever reported (never
its body). For a tenant's ScaledJob under the operator, a URL whose host resolves to a
loopback, link-local (the cloud's metadata service, 169.254.169.254), unspecified or
multicast address is refused, checked before every POST (a DNS name cannot be
repointed between the check at start and the send)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import urllib.parse
from typing import Any

import aiohttp

from jobrunner.core.protocols import SourceError
from jobrunner.sources.http.binding import STRUCTURED

logger = logging.getLogger(__name__)

DEAD_LETTER_TIMEOUT_SECONDS = 10.0
DEAD_LETTER_TRIES = 8


class DeadLetterSink:
    def __init__(self, url: str, *, tenant: bool, scaledjob: str) -> None:
        self.url = url
        self.tenant = tenant
        self.scaledjob = scaledjob
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def post(self, event: dict[str, Any]) -> None:
        """POST until the sink answers 2xx (bounded tries, then SourceError: the Job's
        finalizer keeps the event for the next dispatcher). Only the status code of the
        answer is ever reported."""
        url = self.url
        if self.tenant:
            await refuse_internal(url)
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DEAD_LETTER_TIMEOUT_SECONDS)
            )
        delay = 0.5
        for _ in range(DEAD_LETTER_TRIES):
            try:
                async with self._http.post(
                    url,
                    data=json.dumps(event).encode(),
                    headers={"Content-Type": STRUCTURED},
                    allow_redirects=False,
                ) as response:
                    if 200 <= response.status < 300:
                        return
                    what = f"answered {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                what = f"unreachable ({type(exc).__name__})"
            logger.warning(
                "dead-letter sink %s %s; retrying in %.1fs",
                urllib.parse.urlsplit(url).netloc,
                what,
                delay,
                extra={"scaledjob": self.scaledjob, "source": "http"},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise SourceError(
            f"the dead-letter sink {urllib.parse.urlsplit(url).netloc} did not take the failed "
            f"event after {DEAD_LETTER_TRIES} tries; its Job keeps it and it is sent again "
            "when a dispatcher restarts"
        )


async def refuse_internal(url: str) -> None:
    """A tenant's dead-letter URL must not reach the operator's own host or the cloud's
    metadata service: loopback, link-local (169.254.169.254), unspecified and multicast
    addresses are refused (checked on every POST, so a DNS name cannot be repointed)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    port = urllib.parse.urlsplit(url).port or 443
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # unreachable: the POST fails and is retried
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if (
            address.is_loopback
            or address.is_link_local
            or address.is_unspecified
            or address.is_multicast
        ):
            raise SourceError(
                f"the dead-letter URL's host {host} is an address the operator does not post "
                "to (loopback, link-local, unspecified or multicast); give a Service or an "
                "external URL"
            )
