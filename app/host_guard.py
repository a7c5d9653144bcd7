"""Refuse requests that a web page on another site could make through the user's browser.

DNS rebinding: a page at attacker.example points its name at 127.0.0.1 and then talks to
the GUI as if it were its own server; the browser still sends ``Host: attacker.example``.
A page that calls the GUI directly sends its own ``Origin``. So every HTTP and websocket
request must name this GUI in ``Host``, and an ``Origin``, when present, must be this GUI too.

The rule (README, "Headless use"): loopback names (127.0.0.1, localhost, ::1) on any port,
the ``--listen`` address, and the names given with ``--allowed-hosts`` / ``NEKOYA_ALLOWED_HOSTS``.
Listening on every address (0.0.0.0, ::) with a login, or sharing, accepts any ``Host``
(a LAN user types whatever address reaches the machine; the login protects it); without a
login it adds this machine's own host name and interface addresses. Cross-origin requests
are refused in every case.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
# a host name or IPv4 address, or a bracketed IPv6 address; then an optional port
_HOST_HEADER = re.compile(r"^(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{1,5})?$")


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]  # lower case, IPv6 without brackets; any port
    any_host: bool = False  # every address behind a login: accept the name the user typed

    def problem(self, host: str | None, origin: str | None) -> str | None:
        """Why the request must be refused, or None."""
        host_name = host_name_of(host or "")
        if host_name is None:
            return f"Nekoya refused this request: its Host header {host!r} is not a host name with an optional port."
        if not (self.any_host or host_name in self.names):
            return (f"Nekoya refused this request: Host {host_name!r} is not an address of this GUI. "
                    f"If you reach the GUI by this name, start it with --allowed-hosts {host_name}.")
        if origin is not None and not self._same_site(origin, host or ""):
            return (f"Nekoya refused a request from the web page {origin!r}: only the GUI's own page "
                    "may use it (add its host with --allowed-hosts if it is yours).")
        return None

    def _same_site(self, origin: str, host: str) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.path:
            return False  # "null" (sandboxed frames, files) and anything odd
        return parts.hostname in self.names or parts.netloc.lower() == host.lower()


def host_name_of(value: str) -> str | None:
    """The name in a ``Host`` header without its port ("[::1]:7860" -> "::1"), or None if malformed."""
    match = _HOST_HEADER.match(value.strip())
    if match is None:
        return None
    return (match["ipv6"] or match["name"]).lower()


def split_host_list(text: str | None) -> list[str]:
    """``--allowed-hosts`` / ``NEKOYA_ALLOWED_HOSTS``: comma-separated names, brackets and ports optional."""
    names = []
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            names.append(host_name_of(item) or item.lower())
    return names


def host_policy(listen: str, *, login: bool, share: bool = False, extra_hosts: list[str] = ()) -> HostPolicy:
    names = set(LOOPBACK_NAMES) | {name.lower() for name in extra_hosts}
    wildcard = listen.strip("[]") in WILDCARD_ADDRESSES
    if not wildcard:
        names.add(listen.strip("[]").lower())
    elif not login:
        names |= machine_names()
    return HostPolicy(frozenset(names), any_host=(wildcard and login) or share)


def machine_names() -> set[str]:
    """This machine's host name and interface addresses, read locally (no DNS lookup)."""
    import psutil

    hostname = socket.gethostname().lower()
    names = {hostname, f"{hostname}.local"}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(_plain_address(address.address))
    return names


def _plain_address(address: str) -> str:
    """'fe80::1%eth0' -> 'fe80::1' (a Host header never carries the zone)."""
    address = address.split("%", 1)[0].lower()
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


class HostGuard:
    """ASGI middleware: answers 403 to a request whose Host or Origin the policy refuses."""

    def __init__(self, app, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self.policy.problem(headers.get("host"), headers.get("origin"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        log.warning("%s %s", problem, scope.get("path", ""))
        if scope["type"] == "websocket":  # closing before accepting: the server answers 403
            await send({"type": "websocket.close", "code": 1008})
            return
        await PlainTextResponse(problem, status_code=403)(scope, receive, send)
