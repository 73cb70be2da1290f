"""A small HTTP proxy in front of the moto S3 server that injects faults, for the fault tests.

* ``fail_first=n``: the first ``n`` requests for each distinct (method, path, query) get ``503 SlowDown``
  (S3's throttling answer, which AWS SDKs retry), so every kind of request (list, head, get, put,
  multipart) is failed and retried, deterministically.
* ``always_fail``: keys (substrings of the path) whose GETs always get 503: a failure that stays final.
* ``hold``: keys whose GETs wait until ``release()``: a pipeline held at a known point (for kills).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultyS3Proxy:
    def __init__(
        self, upstream: str, fail_first: int = 0, always_fail: tuple[str, ...] = (), hold: tuple[str, ...] = ()
    ):
        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self.fail_first = fail_first
        self.always_fail = tuple(always_fail)
        self.hold = tuple(hold)
        self.released = threading.Event()
        if not self.hold:
            self.released.set()
        self.seen: Counter = Counter()
        self.injected: Counter = Counter()  # method -> 503s sent
        self.held = 0  # GETs waiting now
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str, path: str) -> str:
        with self.lock:
            key = (method, path)
            self.seen[key] += 1
            if method == "GET" and any(k in path for k in self.always_fail):
                self.injected[method] += 1
                return "fail"
            if self.seen[key] <= self.fail_first:
                self.injected[method] += 1
                return "fail"
        if method == "GET" and any(k in path for k in self.hold):
            return "hold"
        return "forward"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                decision = proxy._decide(self.command, self.path)
                if decision == "fail":
                    payload = b"" if self.command == "HEAD" else SLOW_DOWN
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN) if self.command != "HEAD" else 0))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if decision == "hold":
                    with proxy.lock:
                        proxy.held += 1
                    proxy.released.wait(300)
                    with proxy.lock:
                        proxy.held -= 1
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
