"""The HTTP server at the edge of its resources, in a process of its own: the open-file limit, a retiring generation.

The server runs in a child process (its own RLIMIT_NOFILE, its own CPU ticks in
/proc/<pid>/stat); the test is its clients.
"""

import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import API_PASSWORD, API_USER, RawClient, raw_request, running_server, wait_until

from jobrunner import protocol, server
from jobrunner.config import load_config

HALF_HEAD = b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n"  # the headers never end: the connection stays open

SERVER = textwrap.dedent(
    """
    import logging, resource, socket, sys, threading
    limit = int(sys.argv[2])
    if limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    from jobrunner import server
    from jobrunner.config import load_config
    settings = dict(arg.split("=", 1) for arg in sys.argv[3:])
    config = load_config({}, overrides={"database_url": sys.argv[1], "users": "USERS", **settings})
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    stop = threading.Event()
    ready = lambda: print(sock.getsockname()[1], flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()  # stdin closed: stop
    server.serve(config, sock, stop, ready=ready)
    """
).replace("USERS", f"{API_USER}:{API_PASSWORD}")


def start_server(db_url: str, nofile: int = 0, **settings) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, "-c", SERVER, db_url, str(nofile), *(f"{k}={v}" for k, v in settings.items())]
    process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = process.stdout.readline().strip()
    assert port, process.stderr.read()
    return process, int(port)


def stop_server(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=60)  # closes its stdin: the server stops
    assert process.returncode == 0, stderr
    return stderr


def cpu_ticks(pid: int) -> int:
    """User and system clock ticks the process has used (/proc/<pid>/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def answer_of(sock: socket.socket, within: float) -> bytes:
    """What the server sent on `sock` within `within` seconds (b"" if nothing)."""
    if not select.select([sock], [], [], within)[0]:
        return b""
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def authenticated_get(port: int, path: str = "/v1/jobs") -> int:
    import base64
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        token = base64.b64encode(f"{API_USER}:{API_PASSWORD}".encode()).decode()
        conn.request("GET", path, headers={"Authorization": f"Basic {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU ticks from /proc")
def test_at_the_open_file_limit_the_server_backs_off_answers_503_and_recovers(db_url):
    """accept() failing with EMFILE must not spin the accept loop: log once, back off, refuse quickly, recover."""
    process, port = start_server(db_url, nofile=64, max_request_threads="100", read_timeout="60", server_pool_size="2")
    held = []
    try:
        for _ in range(100):  # more than the process can hold open: the rest wait in the listen queue
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(HALF_HEAD)
            held.append(sock)
        wait_until(lambda: open_files(process.pid) >= 60, "the server to run out of file descriptors")
        before = cpu_ticks(process.pid)
        started = time.monotonic()
        time.sleep(2.0)  # the measurement window: the server's CPU while it is at the limit
        ticks = cpu_ticks(process.pid) - before
        window = time.monotonic() - started
        assert ticks < 0.2 * window * os.sysconf("SC_CLK_TCK"), f"{ticks} ticks in {window:.1f} s at the open-file limit"
        answers = [answer_of(sock, within=0.2) for sock in held[-20:]]
        assert any(answer.startswith(b"HTTP/1.1 503") for answer in answers), answers
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: authenticated_get(port) == 200, "the server to serve again once the connections closed", timeout=15)
    log = stop_server(process)
    assert log.count("cannot accept connections") == 1, log


def test_the_open_file_limit_spares_the_server_when_nothing_exceeds_it(db_url):
    """The same server, under its limit: no warning, requests served (the test above is about the limit, not the setup)."""
    process, port = start_server(db_url, nofile=64, max_request_threads="100", server_pool_size="2")
    try:
        assert authenticated_get(port) == 200
    finally:
        log = stop_server(process)
    assert "cannot accept connections" not in log, log


READ_TIMEOUT = 15


def test_a_retiring_generation_stops_accepting_at_once_and_answers_what_it_took_within_a_bound(db_url):
    """A reload: two servers accept on one socket; the old one stops. Nothing it took is cut off, nothing new reaches it.

    Its client connected, then was slow to send (a loaded machine schedules it out):
    the request is answered, not hung up as an idle connection would be.
    """
    config = load_config({}, overrides={"database_url": db_url, "users": f"{API_USER}:{API_PASSWORD}", "read_timeout": str(READ_TIMEOUT)})
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    old, new = (server.build(config, sock=listening.dup()) for _ in range(2))  # as each forked generation has its copy
    accepting = [threading.Thread(target=generation.serve_forever) for generation in (old, new)]
    for thread in accepting:
        thread.start()
    try:
        slow = RawClient(port)
        wait_until(lambda: len(old.connections) + len(new.connections) == 1, "a server to take the connection")
        if not len(old.connections):  # the new generation took it: swap the roles
            old, new = new, old
        stopping = threading.Thread(target=old.stop)
        started = time.monotonic()
        stopping.start()
        wait_until(lambda: old._stop_accepting and old._loop_ended.is_set(), "the old generation to stop accepting", timeout=5)
        for _ in range(10):  # meanwhile, new clients reach the new generation only
            client = RawClient(port)
            client.send(raw_request("GET", "/healthz"))
            assert client.read_response().status == 200
            client.close()
            assert len(old.connections) == 1, "the retiring generation took a new connection"  # the slow client's only
        time.sleep(0.5)  # the slow client's pause: longer than a quiet kept-alive connection is given
        slow.send(raw_request("GET", "/healthz"))
        answer = slow.read_response()
        slow.close()
        stopping.join(timeout=30)
        took = time.monotonic() - started
        assert answer.status == 200 and answer.headers.get("connection") == "close"
        # bounded by the first-byte timeout, not the read timeout: halfway between leaves a loaded machine room
        assert took < (protocol.FIRST_BYTE_TIMEOUT + READ_TIMEOUT) / 2, f"the old generation took {took:.1f} s to stop"
    finally:
        new.stop()
        for thread in accepting:
            thread.join(timeout=10)
        listening.close()
    assert not [thread for thread in accepting if thread.is_alive()], "a generation did not stop serving"


def serving() -> int:
    """Connections this process's servers are serving: each holds a connection thread, named so while it does."""
    return sum(t.name == "http-connection" for t in threading.enumerate())


def test_a_connection_per_request_starts_no_thread_per_connection(db_url, monkeypatch):
    """Clients that open a connection per request (no session) are served by the thread the first one started."""
    started_by_accept_loop = []
    start = threading.Thread.start

    def counting_start(thread):
        if threading.current_thread().name == "http-accept":
            started_by_accept_loop.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    with running_server(db_url) as api:
        for _ in range(20):
            client = RawClient(api.port)
            client.send(raw_request("GET", "/healthz", ["Connection: close"]))
            assert client.read_response().status == 200
            client.wait_for_close(within=5)
            client.close()
            wait_until(lambda: serving() == 0, "the connection's thread to be free again")
    assert len(started_by_accept_loop) == 1, started_by_accept_loop


def test_connection_threads_left_idle_by_a_burst_end(db_url, monkeypatch):
    """A burst of connections leaves no crowd of idle threads behind, and the next client still gets one."""
    monkeypatch.setattr(protocol, "IDLE_THREAD_SECONDS", 0.2)
    with running_server(db_url) as api:
        burst = [RawClient(api.port) for _ in range(6)]
        for client in burst:
            client.send(raw_request("GET", "/healthz"))
            assert client.read_response().status == 200
        assert serving() == 6  # kept alive, each on its own thread
        for client in burst:
            client.close()
        wait_until(lambda: not [t for t in threading.enumerate() if t.name in ("http-idle", "http-connection")], "the idle threads to end")
        assert api.get("/healthz").status == 200
