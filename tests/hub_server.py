"""A local HTTP server that speaks enough of the Hugging Face hub protocol for ``huggingface_hub``.

It serves dataset and model repositories held in memory: revision info, the recursive tree listing, and
HEAD/GET on ``resolve`` URLs with the headers the client requires (DESIGN §10). Tree entries carry the git
blob id as ``oid``; files at least :data:`LFS_FROM` bytes long (or archives and ``.pt`` files) also carry
``lfs`` with their sha256 and size, as the hub lists LFS files.
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
LFS_FROM = 1 << 20
LFS_SUFFIXES = (".pt", ".pth", ".zip", ".gz", ".tar", ".safetensors")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(path: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    name = path.rsplit("/", 1)[-1]
    if len(data) >= LFS_FROM or name.endswith(LFS_SUFFIXES) or name.rsplit(".", 1)[-1].isdigit():
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class HubHandler(BaseHTTPRequestHandler):
    repos: ClassVar[Mapping[str, Mapping[str, bytes]]] = {}
    models: ClassVar[Mapping[str, Mapping[str, bytes]]] = {}
    served: ClassVar[Mapping[str, bytes]] = {}  # path -> bytes served instead of the listed ones (a damaged transfer)
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
                prefix = "/".join(parts[6:])
                entries = [tree_entry(p, data) for p, data in files.items() if not prefix or p.startswith(prefix + "/")]
                return self._json(entries)
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
def serve_hub(
    repos: Mapping[str, Mapping[str, bytes]],
    models: Mapping[str, Mapping[str, bytes]] | None = None,
    served: Mapping[str, bytes] | None = None,
) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Serve dataset ``repos`` and model repositories ``models`` ({"owner/name": {path: bytes}}) on a free
    local port; yields (endpoint, request log). ``served`` replaces the content sent for some paths
    (the listing keeps the true size and hash), as a damaged transfer would."""
    handler = type(
        "Handler", (HubHandler,), {"repos": repos, "models": models or {}, "served": served or {}, "requests": []}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
