"""A local HTTP server that speaks enough of the Hugging Face hub protocol for ``huggingface_hub``.

It serves dataset repositories held in memory: revision info, the recursive tree listing, and HEAD/GET
on ``resolve`` URLs with the headers the client requires (DESIGN §10).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"


class HubHandler(BaseHTTPRequestHandler):
    repos: ClassVar[Mapping[str, Mapping[str, bytes]]] = {}
    requests: ClassVar[list[tuple[str, str]]] = []

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

    def _json(self, data: object) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _not_found(self, code: str = "RepoNotFound", *, head: bool = False) -> None:
        self._send(
            404, b'{"error": "not found"}', {"X-Error-Code": code, "Content-Type": "application/json"}, head=head
        )

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        type(self).requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._not_found()
            files = self.repos[repo]
            if parts[4] == "revision":
                return self._json(
                    {"id": repo, "sha": SHA, "private": False, "siblings": [{"rfilename": p} for p in files]}
                )
            if parts[4] == "tree":
                prefix = "/".join(parts[6:])
                entries = [
                    {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for p, data in files.items()
                    if not prefix or p.startswith(prefix + "/")
                ]
                return self._json(entries)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            repo = "/".join(parts[1:3])
            if repo not in self.repos:
                return self._not_found(head=head)
            name = "/".join(parts[5:])
            data = self.repos[repo].get(name)
            if data is None:
                return self._not_found("EntryNotFound", head=head)
            headers = {
                "X-Repo-Commit": SHA,
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            return self._send(200, data, headers, head=head)
        return self._not_found()

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@contextmanager
def serve_hub(repos: Mapping[str, Mapping[str, bytes]]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Serve ``repos`` ({"owner/name": {path: bytes}}) on a free local port; yields (endpoint, request log)."""
    handler = type("Handler", (HubHandler,), {"repos": repos, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
