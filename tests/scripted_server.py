"""A scripted HTTP server on loopback for the transport and the clients' answers they cannot use: each request is
answered by a function of `(method, path, body)`. Not a stand-in for vLLM (tests/test_remote_teacher.py and
tests/test_served_student.py run it for real): it serves what vLLM does not, such as replies of the wrong shape, a
hung server, `Retry-After` and oversized answers."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any


#: `answer(method, path, body)` returns `(status, payload)` or `(status, payload, headers)`; a payload of bytes is sent
#: as it is, anything else as JSON. It may block (a hung server) until `ScriptedServer.release` is set.
Answer = Callable[[str, str, Any], tuple]


class ScriptedServer:
    def __init__(self, answer: Answer):
        self.requests: list[tuple[str, str, Any, dict]] = []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                server.requests.append((method, self.path, body, dict(self.headers)))
                status, payload, *rest = answer(method, self.path, body)
                headers = rest[0] if rest else {}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def posts(self, path: str) -> int:
        return sum(1 for method, p, _, _ in self.requests if method == "POST" and p == path)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
