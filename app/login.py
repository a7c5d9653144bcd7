"""Slow down password guessing on the GUI's login form.

Gradio checks the password (``POST /login``: 200 when right); this ASGI middleware counts
the failures of each client address. After ``FREE_FAILURES`` wrong passwords in a row the address
must wait ``FIRST_WAIT_S`` seconds, doubling with each further failure up to ``MAX_WAIT_S``;
meanwhile its logins are refused (429) without checking the password, so a guesser gets a
few tries an hour instead of hundreds a second. A correct password clears the count.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from starlette.responses import JSONResponse

FREE_FAILURES = 5
FIRST_WAIT_S = 30.0
MAX_WAIT_S = 900.0
MAX_TRACKED = 10_000  # client addresses remembered; the oldest are forgotten beyond this


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(self):
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def begin_attempt(self, client: str) -> float:
        """Seconds ``client`` must still wait (the attempt is refused), or 0 after counting it as failed.

        Counted before the password is checked, so that many attempts sent at once cannot all
        slip in before the first answers; a correct password then clears the count.
        """
        with self._lock:
            now = time.monotonic()
            record = self._records.pop(client, None) or _Record()
            self._records[client] = record  # re-inserted: most recent last
            if record.locked_until > now:
                return record.locked_until - now
            record.failures += 1
            extra = record.failures - FREE_FAILURES
            if extra >= 0:
                record.locked_until = now + min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** extra)
            while len(self._records) > MAX_TRACKED:
                del self._records[next(iter(self._records))]
            return 0.0

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._records.pop(client, None)

    def middleware(self, app):
        """Wrap an ASGI app: login posts pass through this throttle, everything else goes straight on."""

        async def guarded(scope, receive, send):
            if not _is_login_post(scope):
                await app(scope, receive, send)
                return
            client = (scope.get("client") or ("?",))[0]
            wait = self.begin_attempt(client)
            if wait > 0:
                seconds = math.ceil(wait)
                message = f"Too many wrong passwords from this address: try again in {seconds} s."
                response = JSONResponse({"detail": message}, status_code=429, headers={"Retry-After": str(seconds)})
                await response(scope, receive, send)
                return

            async def send_noting_success(message):
                if message["type"] == "http.response.start" and message["status"] == 200:
                    self.succeeded(client)
                await send(message)

            await app(scope, receive, send_noting_success)

        return guarded


def _is_login_post(scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") == "/login"
