"""A fast downstream for benchmarks: answer every job POST with 202 at once, then call back `succeeded`.

    python bench/fast_downstream.py --port P --api http://127.0.0.1:Q --user U --password W
        [--callback-connections 8] [--fresh-callbacks] [--arrivals -]
    python bench/fast_downstream.py --selftest [--seconds 5] [--close]   # its own ceiling, with wrk

Stdlib only, one asyncio loop. It accepts `POST /v1/jobs/<name>/<id>` (CONTRACT.md §6.3)
on HTTP/1.1 keep-alive or one-shot connections, answers `202 {"status": "accepted"}`
(what Rickover's downstream-benchmark-server says), and queues a callback
`POST /v1/jobs/<name>/<id> {"status":"succeeded","attempt":N}` (N = the `attempts`
it was sent) that a few kept-alive connections to the API send, one request at a
time each. With --fresh-callbacks every callback opens a new connection and asks
`Connection: close` (a Python `requests.post` without a session, or Go's default
client under load, which keeps only 2 idle connections per host). TCP_NODELAY everywhere; every response is one write.

`GET /stats` answers counters as JSON. `--arrivals -` prints
`<time.monotonic()> <name> <id>` for every POST to stdout (a pipe; the clock is
CLOCK_MONOTONIC, the same in every process), for latency measurements.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ACCEPTED = b'{"status": "accepted"}'
RESPONSE_202 = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ACCEPTED)).encode() + b"\r\n\r\n" + ACCEPTED
)
RESPONSE_202_CLOSE = RESPONSE_202.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
    """(start line, lower-cased headers, body) of one HTTP/1.1 message; None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise ConnectionError("connection closed mid-message") from None
        return None
    lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the empty line
                    pass
                break
            body += (await reader.readexactly(size + 2))[:-2]
    else:
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return lines[0], headers, body


class Downstream:
    def __init__(self, api: str, user: str, password: str, callback_connections: int, arrivals, fresh: bool = False):
        parsed = urllib.parse.urlsplit(api)
        self.api_host, self.api_port = parsed.hostname, parsed.port or 80
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.callback_head = (
            f"Host: {parsed.netloc}\r\nAuthorization: Basic {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.callback_connections = callback_connections
        self.fresh = fresh
        if fresh:
            self.callback_head = self.callback_head.replace(b"Content-Type", b"Connection: close\r\nContent-Type", 1)
        self.arrivals = arrivals
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stats = {"posts": 0, "bad_requests": 0, "callbacks_ok": 0, "callbacks_failed": 0, "connections": 0}
        self.last_errors: list[str] = []

    # --- the downstream side ---

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        self.stats["connections"] += 1
        try:
            while True:
                message = await read_message(reader)
                if message is None:
                    break
                start, headers, body = message
                method, path, version = start.split(b" ", 2)
                close = version == b"HTTP/1.0" or headers.get(b"connection", b"").lower() == b"close"
                if method == b"GET" and path == b"/stats":
                    payload = json.dumps({**self.stats, "pending_callbacks": self.queue.qsize()}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
                elif method == b"POST" and path.startswith(b"/v1/jobs/"):
                    parts = path.split(b"/")  # ['', 'v1', 'jobs', name, id]
                    try:
                        attempts = json.loads(body)["attempts"]
                        name, job_id = parts[3], parts[4]
                    except (ValueError, KeyError, IndexError, TypeError):
                        self.stats["bad_requests"] += 1
                        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    else:
                        self.stats["posts"] += 1
                        if self.arrivals is not None:
                            self.arrivals.write(f"{time.monotonic():.6f} {name.decode()} {job_id.decode()}\n")
                            self.arrivals.flush()
                        writer.write(RESPONSE_202_CLOSE if close else RESPONSE_202)
                        self.queue.put_nowait((path, attempts))
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    # --- the callback side ---

    async def callback_sender(self) -> None:
        reader = writer = None
        while True:
            path, attempt = await self.queue.get()
            body = b'{"status":"succeeded","attempt":%d}' % attempt
            request = b"POST %s HTTP/1.1\r\n%s%d\r\n\r\n%s" % (path, self.callback_head, len(body), body)
            for retry in range(5):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(self.api_host, self.api_port)
                        _nodelay(writer)
                    writer.write(request)
                    message = await read_message(reader)
                    if message is None:
                        raise ConnectionError("the API closed the connection")
                    status_line, headers, answer = message
                    if self.fresh or headers.get(b"connection", b"").lower() == b"close":
                        writer.close()
                        reader = writer = None
                    status = int(status_line.split(b" ", 2)[1])
                    if 200 <= status < 300:
                        self.stats["callbacks_ok"] += 1
                    else:
                        self.stats["callbacks_failed"] += 1
                        self._note(f"{path.decode()}: HTTP {status} {answer[:200]!r}")
                    break
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    if retry == 4:
                        self.stats["callbacks_failed"] += 1
                        self._note(f"{path.decode()}: {error!r}")
                    await asyncio.sleep(0.05 * (retry + 1))

    def _note(self, error: str) -> None:
        self.last_errors = (self.last_errors + [error])[-5:]
        print(f"fast_downstream: callback failed: {error}", file=sys.stderr, flush=True)

    async def run(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self.serve_client, host, port, backlog=1024, reuse_address=True)
        senders = [asyncio.create_task(self.callback_sender()) for _ in range(self.callback_connections)]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"fast_downstream: listening on {host}:{port}", file=sys.stderr, flush=True)
        async with server:
            await stop.wait()
        for sender in senders:
            sender.cancel()
        print(f"fast_downstream: {json.dumps(self.stats)}", file=sys.stderr, flush=True)


# --- --selftest: the downstream's own ceiling ---------------------------------

async def _sink(port: int) -> None:
    """A stand-in API: answers every request 200 with an empty body, on keep-alive."""
    async def serve(reader, writer):
        _nodelay(writer)
        try:
            while await read_message(reader) is not None:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def selftest(seconds: int, connections: int, close: bool) -> None:
    """POST as fast as wrk can on `connections` keep-alive connections, or a new connection per POST
    with `close` (as urllib does); the sink API runs in its own process."""
    wrk = shutil.which("wrk") or sys.exit("fast_downstream: --selftest needs wrk")
    sink_port, port = _free_port(), _free_port()
    me = os.path.abspath(__file__)
    sink = subprocess.Popen([sys.executable, me, "--sink", str(sink_port)])
    downstream = subprocess.Popen([sys.executable, me, "--port", str(port), "--api", f"http://127.0.0.1:{sink_port}",
                                   "--user", "u", "--password", "p"], stderr=subprocess.DEVNULL)
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write('wrk.method = "POST"\nwrk.body = \'{"data":{"n":1},"attempts":3}\'\n'
                 'wrk.headers["Content-Type"] = "application/json"\n'
                 + ('wrk.headers["Connection"] = "close"\n' if close else "")
                 + 'request = function() return wrk.format(nil, "/v1/jobs/bench/job_" .. math.random(1, 1e9)) end\n')
    script.close()
    try:
        stats_url = f"http://127.0.0.1:{port}/stats"
        for _ in range(100):
            try:
                urllib.request.urlopen(stats_url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        start = time.monotonic()
        output = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name,
                                 f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
        while True:  # until every callback has gone out
            stats = json.loads(urllib.request.urlopen(stats_url, timeout=5).read())
            if stats["pending_callbacks"] == 0 and stats["callbacks_ok"] + stats["callbacks_failed"] >= stats["posts"]:
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        print(output.strip())
        print(f"fast_downstream ceiling: {stats['posts'] / elapsed:,.0f} jobs/s (POST answered and called back), "
              f"{stats['posts']:,} POSTs in {elapsed:.1f} s over {connections} "
              f"{'one-shot' if close else 'keep-alive'} connections, "
              f"{stats['callbacks_failed']} callbacks failed")
    finally:
        os.unlink(script.name)
        for process in (downstream, sink):
            process.terminate()
            process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api", help="base URL of the queue's HTTP API, for callbacks")
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--callback-connections", type=int, default=32)
    parser.add_argument("--fresh-callbacks", action="store_true", help="a new connection for every callback")
    parser.add_argument("--arrivals", choices=["-"], help="print '<monotonic> <name> <id>' per POST to stdout")
    parser.add_argument("--selftest", action="store_true", help="measure this downstream's own ceiling (needs wrk)")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--close", action="store_true", help="--selftest: a new connection per POST")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(_sink(args.sink))
    elif args.selftest:
        selftest(args.seconds, args.connections, args.close)
    else:
        if args.port is None or not args.api:
            parser.error("--port and --api are needed")
        downstream = Downstream(args.api, args.user, args.password, args.callback_connections,
                                sys.stdout if args.arrivals else None, args.fresh_callbacks)
        asyncio.run(downstream.run(args.host, args.port))


if __name__ == "__main__":
    main()
