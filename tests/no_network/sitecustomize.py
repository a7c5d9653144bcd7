"""Socket guard for test subprocesses: put this folder on PYTHONPATH and set NEKOYA_SOCKET_LOG.

Python imports ``sitecustomize`` at start-up, before the program runs. Every name lookup and
connection to anything but this machine is written to the log file (one line each, with the
Python stack that made it) and then fails, as it would on an offline machine.
"""
import os
import socket
import traceback

LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}
_log_path = os.environ["NEKOYA_SOCKET_LOG"]
_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _refuse(what, host):
    stack = "".join(traceback.format_stack(limit=12)[:-2]).replace("\n", " | ")
    with open(_log_path, "a", encoding="utf-8") as log:
        log.write(f"{what} {host!r} from: {stack}\n")
    raise OSError(f"network access blocked by the test: {what} {host!r}")


def _host(address):
    return str(address[0]) if isinstance(address, tuple) else None  # AF_UNIX paths are local


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and str(name) not in LOCAL:
        _refuse("getaddrinfo", name)
    return _getaddrinfo(host, *args, **kwargs)


def connect(self, address):
    host = _host(address)
    if host is not None and host not in LOCAL:
        _refuse("connect", host)
    return _connect(self, address)


def connect_ex(self, address):
    host = _host(address)
    if host is not None and host not in LOCAL:
        _refuse("connect", host)
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
