"""A local HTTP server that speaks enough of the Hugging Face hub protocol for ``huggingface_hub``.

It serves dataset and model repositories held in memory: revision info, the recursive tree listing (in
pages linked by a ``Link`` header, as the hub pages it), and HEAD/GET on ``resolve`` URLs with the headers
the client requires (DESIGN §10), honouring ``Range: bytes=N-`` with ``206 Partial Content`` as the hub
does. Tree entries carry the git blob id as ``oid``; files at least :data:`LFS_FROM` bytes long (or
archives and ``.pt`` files) also carry ``lfs`` with their sha256 and size, as the hub lists LFS files.

Faults a real hub or network shows can be staged per file (or for the tree listing): a slow transfer,
a connection reset or a body cut short in mid-transfer, a ``500``; :func:`silent_hub` accepts connections
and never answers; :func:`fail_writes_under` makes the local disk full or read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlparse

import pytest

SHA = "0123456789abcdef0123456789abcdef01234567"
LFS_FROM = 1 << 20
LFS_SUFFIXES = (".pt", ".pth", ".zip", ".gz", ".tar", ".safetensors")
CHUNK = 16 << 10  # bytes sent at a time, so that a pace and a fault land inside a transfer
FAULTS = ("reset", "truncate", "500")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(path: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    name = path.rsplit("/", 1)[-1]
    if len(data) >= LFS_FROM or name.endswith(LFS_SUFFIXES) or name.rsplit(".", 1)[-1].isdigit():
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class RequestLog(list[tuple[str, str]]):
    """(method, path) of every request; ``ranges`` holds (file path, first byte) of each ranged GET."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges: list[tuple[str, int]] = []

    def clear(self) -> None:
        super().clear()
        self.ranges.clear()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub: a reset or a short body is then visible as such
    repos: ClassVar[Mapping[str, Mapping[str, bytes]]] = {}
    models: ClassVar[Mapping[str, Mapping[str, bytes]]] = {}
    served: ClassVar[Mapping[str, bytes]] = {}  # path -> bytes served instead of the listed ones (a damaged transfer)
    faults: ClassVar[Mapping[str, str]] = {}  # path (or "tree") -> one of FAULTS
    pace: ClassVar[Mapping[str, float]] = {}  # path -> seconds between chunks of CHUNK bytes
    page_size: ClassVar[int] = 1000
    honour_ranges: ClassVar[bool] = True  # False: answer a ranged GET with the whole file, as some proxies do
    requests: ClassVar[RequestLog] = RequestLog()

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(
        self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None, *, head: bool = False
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _not_found(self, code: str = "RepoNotFound", *, head: bool = False) -> None:
        self._send(
            404, b'{"error": "not found"}', {"X-Error-Code": code, "Content-Type": "application/json"}, head=head
        )

    def _fail(self, fault: str, body: bytes, headers: Mapping[str, str]) -> None:
        """A 500, or a body cut off half-way by a reset (RST) or a plain close (FIN)."""
        if fault == "500":
            self._send(500, b'{"error": "internal error"}', {"Content-Type": "application/json"})
            return
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: max(1, len(body) // 2)])
        self.wfile.flush()
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _tree(self, files: Mapping[str, bytes], prefix: str, query: str) -> None:
        entries = [tree_entry(p, data) for p, data in files.items() if not prefix or p.startswith(prefix + "/")]
        start = int(parse_qs(query).get("cursor", ["0"])[0])
        page = entries[start : start + self.page_size]
        if self.faults.get("tree") and start > 0:  # a fault in the middle of the listing: on its second page
            return self._fail(self.faults["tree"], json.dumps(page).encode(), {"Content-Type": "application/json"})
        headers = {}
        if start + self.page_size < len(entries):
            url = f"http://{self.headers['Host']}{urlparse(self.path).path}?recursive=True&cursor={start + self.page_size}"
            headers["Link"] = f'<{url}>; rel="next"'
        return self._json(page, headers)

    def _file(self, name: str, data: bytes, head: bool) -> None:
        headers = {
            "X-Repo-Commit": SHA,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if head:
            return self._send(200, data, headers, head=True)
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
        if ranged:
            type(self).requests.ranges.append((name, int(ranged[1])))
        ranged = ranged if self.honour_ranges else None
        start = int(ranged[1]) if ranged else 0
        if ranged:
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if self.faults.get(name):
            return self._fail(self.faults[name], body, headers)
        self.send_response(206 if ranged else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for offset in range(0, len(body), CHUNK):
            if self.pace.get(name):
                time.sleep(self.pace[name])
            try:
                self.wfile.write(body[offset : offset + CHUNK])
            except OSError:  # the client went away (interrupted): as a server, carry on
                self.close_connection = True
                return
        return None

    def _route(self, head: bool) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        type(self).requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("datasets", "models"):
            store = self.repos if parts[1] == "datasets" else self.models
            repo = "/".join(parts[2:4])
            if repo not in store:
                return self._not_found()
            files = store[repo]
            if parts[4] == "revision":
                return self._json(
                    {"id": repo, "sha": SHA, "private": False, "siblings": [{"rfilename": p} for p in files]}
                )
            if parts[4] == "tree":
                return self._tree(files, "/".join(parts[6:]), url.query)
        dataset = parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve"
        model = len(parts) >= 5 and parts[2] == "resolve" and parts[0] != "datasets"
        if dataset or model:
            store, first = (self.repos, 1) if dataset else (self.models, 0)
            repo = "/".join(parts[first : first + 2])
            if repo not in store:
                return self._not_found(head=head)
            name = "/".join(parts[first + 4 :])
            data = self.served.get(name, store[repo].get(name))
            if data is None:
                return self._not_found("EntryNotFound", head=head)
            return self._file(name, data, head)
        return self._not_found()

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up early (an interrupted or failed run) is no error of the hub's


@contextmanager
def serve_hub(
    repos: Mapping[str, Mapping[str, bytes]],
    models: Mapping[str, Mapping[str, bytes]] | None = None,
    served: Mapping[str, bytes] | None = None,
    *,
    faults: MutableMapping[str, str] | None = None,
    pace: MutableMapping[str, float] | None = None,
    page_size: int = 1000,
    honour_ranges: bool = True,
) -> Iterator[tuple[str, RequestLog]]:
    """Serve dataset ``repos`` and model repositories ``models`` ({"owner/name": {path: bytes}}) on a free
    local port; yields (endpoint, request log). ``served`` replaces the content sent for some paths
    (the listing keeps the true size and hash), as a damaged transfer would. ``faults`` and ``pace`` are
    read at each request: a test changes them to heal or slow the hub between two runs."""
    handler = type(
        "Handler",
        (HubHandler,),
        {
            "repos": repos,
            "models": models or {},
            "served": served or {},
            "faults": {} if faults is None else faults,
            "pace": {} if pace is None else pace,
            "page_size": page_size,
            "honour_ranges": honour_ranges,
            "requests": RequestLog(),
        },
    )
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent_hub() -> Iterator[str]:
    """An endpoint that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def fail_writes_under(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int, *, after: int = 0) -> None:
    """Writes into files under ``folder`` fail with ``code`` once ``after`` bytes went in (0: at the open,
    as on a read-only file system), as a full or read-only disk makes them (chmod does not stop root)."""
    real_open, real_write, real_close = os.open, os.write, os.close
    ours: dict[int, int] = {}

    def fake_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        inside = str(Path(os.fsdecode(path)).resolve()).startswith(str(folder.resolve()))  # type: ignore[arg-type]
        if inside and flags & (os.O_WRONLY | os.O_RDWR) and after == 0:
            raise OSError(code, os.strerror(code), os.fsdecode(path))  # type: ignore[arg-type]
        fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]
        if inside and flags & (os.O_WRONLY | os.O_RDWR):
            ours[fd] = 0
        return fd

    def fake_write(fd: int, data: bytes) -> int:
        if fd in ours:
            if ours[fd] + len(data) > after:
                raise OSError(code, os.strerror(code))
            ours[fd] += len(data)
        return real_write(fd, data)

    def fake_close(fd: int) -> None:
        ours.pop(fd, None)
        real_close(fd)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    monkeypatch.setattr(os, "close", fake_close)
