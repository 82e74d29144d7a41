"""A small downstream for development: accepts every job and calls back `succeeded` at once.

`jobrunner run` starts it when neither DATABASE_URL nor DOWNSTREAM_URL is set,
so that a first job goes all the way through. Real deployments point
DOWNSTREAM_URL at their own service.
"""

import base64
import json
import logging
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .models import CALLBACK_TOKEN_HEADER

log = logging.getLogger(__name__)


def serve(sock: socket.socket, api_url: str, user: str, password: str, stop: threading.Event) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            job = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            log.info("example downstream: ran %s with data %s", self.path, json.dumps(job.get("data")))
            headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
            if CALLBACK_TOKEN_HEADER in self.headers:  # the job type's callback token: handed back with the callback
                headers[CALLBACK_TOKEN_HEADER] = self.headers[CALLBACK_TOKEN_HEADER]
            callback = urllib.request.Request(
                api_url + self.path,
                data=json.dumps({"status": "succeeded", "attempt": job.get("attempts", 0)}).encode(),
                headers=headers,
                method="POST",
            )
            try:
                urllib.request.urlopen(callback, timeout=10).read()
            except OSError as error:
                log.warning("example downstream: callback for %s failed: %s", self.path, error)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    sock.setblocking(False)  # each reload's generation accepts on it too: see server.APIServer
    server.socket = sock
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
