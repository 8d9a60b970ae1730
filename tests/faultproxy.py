"""A fault-injecting HTTP proxy for S3 tests, on 127.0.0.1 in front of an S3 endpoint (moto).

A set fraction of requests (spread evenly, so a run of n requests sees round(n * fraction) faults)
gets, in turn: a 503 SlowDown answer, a connection reset, or a stall before being forwarded.
Requests whose path matches `fail` always get a 503 (a permanently failing object). Faults happen
before the request reaches the store, so an injected fault never has a side effect.
"""
from __future__ import annotations

import http.client
import re
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("slowdown", "reset", "stall")
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that gave up on a stalled request (its timeout) is expected here, not an error."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str, fraction: float = 0.05, stall_seconds: float = 2.0, fail: str | None = None,
                 kinds: tuple[str, ...] = KINDS):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.fraction, self.stall_seconds, self.kinds = fraction, stall_seconds, kinds
        self.fail = re.compile(fail) if fail else None
        self.requests, self.counts, self._lock = 0, {k: 0 for k in (*KINDS, "fail")}, threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def faults(self) -> int:
        return sum(self.counts.values())

    def decide(self, path: str) -> str | None:
        with self._lock:
            n, self.requests = self.requests, self.requests + 1
            kind = None
            if self.fail and self.fail.search(path):
                kind = "fail"
            elif int((n + 1) * self.fraction) > int(n * self.fraction):
                kind = self.kinds[sum(self.counts[k] for k in KINDS) % len(self.kinds)]
            if kind:
                self.counts[kind] += 1
            return kind

    def start(self) -> "FaultProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
                pass

            def chunked(self) -> bool:
                return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

            def body(self) -> bytes:
                if self.chunked():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if not size:  # last chunk: skip the trailer lines up to the blank line
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size + 2)[:size]
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def handle_one(self) -> None:
                data = self.body()
                kind = proxy.decide(self.path)
                if kind in ("slowdown", "fail"):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                if kind == "reset":  # RST instead of FIN: the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if kind == "stall":
                    time.sleep(proxy.stall_seconds)
                self.forward(data)

            def forward(self, data: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"content-length"}}
                if self.chunked():  # re-chunk: S3 servers read aws-chunked uploads as a chunked stream
                    headers["Transfer-Encoding"] = "chunked"
                    conn.request(self.command, self.path, body=iter([data]), headers=headers, encode_chunked=True)
                else:
                    if data or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(data))
                    conn.request(self.command, self.path, body=data or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        return Handler
