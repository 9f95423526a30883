"""A small OpenAI-compatible chat-completions server on loopback, for the judge reward's tests.

It answers ``GET /v1/models`` and ``POST /v1/chat/completions``. Its ``mode`` says how:

- ``match``: YES when the reference answer (between "Reference answer:" and "Student's
  response:" in the built-in template) appears in the student's response, else NO;
- ``faithful``: for RePO's faithfulness template, YES when every word of four letters or more of
  the reference solution appears in the student's solution (its working, not its answer), else NO;
- ``yes`` / ``no``: always that word;
- ``garbage``: a reply with no verdict;
- ``fail``: HTTP 500; ``fail_first:K``: HTTP 503 for the first K requests, then ``match``;
- ``slow:S``: sleep S seconds, then ``match``.

Every request is recorded (path, headers, JSON body) in :attr:`JudgeServer.requests`; in ``slow``
mode :attr:`JudgeServer.max_in_flight` is the most requests it held at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional


class JudgeServer:
    def __init__(self, model: str = "stub-judge", mode: str = "match", key: Optional[str] = None) -> None:
        self.model, self.mode, self.key = model, mode, key
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _authorized(self) -> bool:
                if outer.key is None:
                    return True
                return self.headers.get("Authorization") == f"Bearer {outer.key}"

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorized():
                    return self._send(401, {"error": "bad key"})
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                self._send(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    count = len(outer.requests)
                if not self._authorized():
                    return self._send(401, {"error": "bad key"})
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                mode, _, arg = outer.mode.partition(":")
                if mode == "fail":
                    return self._send(500, {"error": "boom"})
                if mode == "fail_first" and count <= int(arg):
                    return self._send(503, {"error": "busy"})
                if mode == "slow":
                    with outer.lock:
                        outer.in_flight += 1
                        outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    time.sleep(float(arg))
                    with outer.lock:
                        outer.in_flight -= 1
                text = body["messages"][-1]["content"]
                if mode == "yes":
                    reply = "YES"
                elif mode == "no":
                    reply = "NO"
                elif mode == "faithful":
                    m = re.search(r"Reference solution:\n(.*?)\n\nStudent's solution:\n(.*?)\n\nDoes", text, re.S)
                    words = [w for w in m.group(1).split() if len(w) >= 4] if m else []
                    reply = "YES" if m and words and all(w in m.group(2) for w in words) else "NO"
                elif mode == "garbage":
                    reply = "I am not sure what you mean."
                else:
                    m = re.search(r"Reference answer:\n(.*?)\n\nStudent's response:\n(.*?)\n\nDoes", text, re.S)
                    reply = "YES" if m and m.group(1).strip() and m.group(1).strip() in m.group(2) else "NO"
                self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat_requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"].rstrip("/").endswith("/chat/completions")]
