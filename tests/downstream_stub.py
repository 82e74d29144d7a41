"""A downstream service for tests: records every POST, answers as the test says, calls back like a real one."""

import base64
import dataclasses
import http.client
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What the stub does with one POST, decided by the test's `policy(post)`:
ACCEPT = "accept"  # 202, then call back `succeeded` after `hold` seconds
ACCEPT_AND_FAIL = "accept_and_fail"  # 202, then call back `failed`
ACCEPT_SILENTLY = "accept_silently"  # 202, never call back
EMPTY_202 = "empty_202"  # 202 with an empty body (Rickover counted it a failure), then call back
ERROR_500 = "error_500"
UNAVAILABLE = "unavailable"  # 503
RICKOVER_UNAVAILABLE = "rickover_unavailable"  # 500 with Rickover's service_unavailable body
HANG = "hang"  # answer nothing until the client gives up
CALL_BACK_THEN_UNAVAILABLE = "call_back_then_unavailable"  # call back `succeeded`, then answer 503 (a proxy timing out)


CALLBACK_TOKEN = "jobrunner-callback-token"


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 refuses connections under load


@dataclasses.dataclass
class Post:
    at: float  # time.monotonic()
    name: str
    job_id: str
    body: dict
    authorization: str
    path: str = ""
    action: str = ""
    headers: dict = dataclasses.field(default_factory=dict)  # names in lower case
    raw: bytes = b""  # the body as received, which a signature covers

    @property
    def attempts(self) -> int:
        return self.body["attempts"]


class DownstreamStub:
    def __init__(self, api_port: int, api_auth: tuple[str, str], password: str = "downstream-secret", hold: float = 0.0):
        self.api_port, self.api_auth, self.password, self.hold = api_port, api_auth, password, hold
        self.policy: Callable[[Post], str] = lambda post: ACCEPT
        self.posts: list[Post] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.callback_errors: list[str] = []
        self._lock = threading.Lock()
        self._release_hangs = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                stub._handle(self)

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._release_hangs.set()
        self.server.shutdown()
        self.server.server_close()

    def posts_for(self, job_id: str) -> list[Post]:
        with self._lock:
            return [post for post in self.posts if post.job_id == job_id]

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        raw = request.rfile.read(int(request.headers["Content-Length"]))
        name, job_id = request.path.split("/")[-2:]  # .../v1/jobs/<name>/<id>, after a type's own base path
        headers = {key.lower(): value for key, value in request.headers.items()}
        post = Post(
            time.monotonic(), name, job_id, json.loads(raw), request.headers.get("Authorization", ""), request.path, headers=headers, raw=raw
        )
        post.action = self.policy(post)
        with self._lock:
            self.posts.append(post)
        if post.action == HANG:
            self._release_hangs.wait(60)
            request.close_connection = True
            return
        if post.action in (ACCEPT, ACCEPT_AND_FAIL, ACCEPT_SILENTLY, EMPTY_202):
            self._count(name, +1)
            answer = b"" if post.action == EMPTY_202 else b'{"status":"accepted"}'
            self._answer(request, 202, answer)
            if post.action != ACCEPT_SILENTLY:
                status = "failed" if post.action == ACCEPT_AND_FAIL else "succeeded"
                threading.Thread(target=self._call_back, args=(post, status), daemon=True).start()
            return
        if post.action == CALL_BACK_THEN_UNAVAILABLE:
            self._count(name, +1)
            self._call_back(post, "succeeded")
            self._answer(request, 503, b'{"title":"busy","id":"service_unavailable"}')
        elif post.action == UNAVAILABLE:
            self._answer(request, 503, b'{"title":"busy","id":"service_unavailable"}')
        elif post.action == RICKOVER_UNAVAILABLE:
            self._answer(request, 500, b'{"title":"Service Unavailable","id":"service_unavailable"}')
        else:
            self._answer(request, 500, b'{"title":"boom","id":"server_error"}')

    def _answer(self, request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def _count(self, name: str, change: int) -> None:
        with self._lock:
            self.in_flight[name] = self.in_flight.get(name, 0) + change
            self.max_in_flight[name] = max(self.max_in_flight.get(name, 0), self.in_flight[name])

    def _call_back(self, post: Post, status: str) -> None:
        if self.hold:
            time.sleep(self.hold)  # the downstream's work; not a wait for a condition
        # no longer in flight once the callback is on its way: the job may then be freed any moment
        self._count(post.name, -1)
        # like a real downstream, retry while the queue's API is unreachable (a restart)
        for attempt in range(100):
            try:
                status_code = self._send_callback(post, status)
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)
                continue
            if status_code != 200 and not (attempt and status_code == 400):  # a retry may find it done
                self.callback_errors.append(f"{post.job_id}: {status_code}")
            return
        self.callback_errors.append(f"{post.job_id}: API unreachable")

    def _send_callback(self, post: Post, status: str) -> int:
        token = base64.b64encode(":".join(self.api_auth).encode()).decode()
        headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        if CALLBACK_TOKEN in post.headers:  # a job type's callback token: handed back, as a downstream should
            headers[CALLBACK_TOKEN] = post.headers[CALLBACK_TOKEN]
        connection = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        try:
            connection.request(
                "POST",
                f"/v1/jobs/{post.name}/{post.job_id}",
                body=json.dumps({"status": status, "attempt": post.attempts}),
                headers=headers,
            )
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()
