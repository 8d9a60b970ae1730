"""A fault-injecting HTTP proxy for S3 tests, on 127.0.0.1 in front of an S3 endpoint (moto).

A set fraction of requests (spread evenly, so a run of n requests sees round(n * fraction) faults)
gets, in turn:
- slowdown: a 503 SlowDown answer; the request never reaches the store;
- reset: the connection is reset; the request never reaches the store;
- stall: the request waits `stall_seconds`, then is forwarded: a client that timed out meanwhile has
  retried it, so it may be applied twice;
- lost: the request is forwarded and applied, and its reply is replaced by a connection reset: the
  client retries a request that already took effect (a retried conditional write then sees its own
  write as a conflict).
Requests matching `fail` (a regex over "METHOD path") get a 503, always or for the first
`fail_first` of them (a permanently or a temporarily failing object); requests matching `delay` wait
`delay_seconds` before being forwarded (a slow store, to land a kill inside an operation).
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

KINDS = ("slowdown", "reset", "stall", "lost")
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
                 kinds: tuple[str, ...] = KINDS, fail_first: int | None = None, delay: str | None = None,
                 delay_seconds: float = 0.0, lose: str | None = None, lose_first: int = 1):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.fraction, self.stall_seconds, self.kinds = fraction, stall_seconds, kinds
        self.fail = re.compile(fail) if fail else None
        self.fail_first = fail_first
        self.delay, self.delay_seconds = (re.compile(delay) if delay else None), delay_seconds
        self.lose, self.lose_first, self.lost_on_purpose = (re.compile(lose) if lose else None), lose_first, 0
        self.injected: list[tuple[str, str]] = []  # (kind, request) of every fault, in order
        self.requests, self.counts, self._lock = 0, {k: 0 for k in (*KINDS, "fail")}, threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def faults(self) -> int:
        return sum(self.counts.values())

    def decide(self, request: str) -> str | None:
        with self._lock:
            n, self.requests = self.requests, self.requests + 1
            kind = None
            if self.fail and self.fail.search(request) and (self.fail_first is None or self.counts["fail"] < self.fail_first):
                kind = "fail"
            elif self.lose and self.lose.search(request) and self.lost_on_purpose < self.lose_first:
                kind, self.lost_on_purpose = "lost", self.lost_on_purpose + 1
            elif int((n + 1) * self.fraction) > int(n * self.fraction):
                kind = self.kinds[sum(self.counts[k] for k in KINDS) % len(self.kinds)]
            if kind:
                self.counts[kind] += 1
                self.injected.append((kind, request))
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
                request = f"{self.command} {self.path}"
                kind = proxy.decide(request)
                if proxy.delay and proxy.delay.search(request):
                    time.sleep(proxy.delay_seconds)
                if kind in ("slowdown", "fail"):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                if kind == "reset":
                    self.reset()
                    return
                if kind == "stall":
                    time.sleep(proxy.stall_seconds)
                self.forward(data, lose_reply=kind == "lost")

            def reset(self) -> None:
                """RST instead of FIN: the client sees "connection reset by peer"."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def forward(self, data: bytes, lose_reply: bool = False) -> None:
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
                if lose_reply:
                    self.reset()
                    return
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
