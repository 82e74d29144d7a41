"""The kinds of child the supervisor forks, and the wrapper that runs one.

Each kind (server, watcher with the host's scheduler, worker, the development downstream) is one entry in
KINDS: its name, how many the config wants, and its `run(config, stop, ready,
context)`, which serves until `stop` is set, calls `ready()` once it serves (the
supervisor's READY=1 and a reload's switch wait for every child's), and counts
in `context.metrics`. Adding a kind is one entry and one run function.

child_main does what every kind needs, once: it resets the signals inherited
from the supervisor, names the process, exits when orphaned, and publishes the
kind's metrics for the servers' /metrics to add up.

A child stops gracefully on SIGTERM (from the supervisor), ignores the signals
that belong to the supervisor (SIGINT from a terminal's Ctrl-C reaches the
whole process group; SIGHUP, SIGTTIN, SIGTTOU), and exits by itself when its
parent is gone.

The supervisor imports this module, never the other way round. Importing it
imports every kind's code, before the supervisor's first fork: the children
then share that memory instead of each importing into its own (a worker: ~10 MB
of its ~13 MB). The price, as with gunicorn's preload_app: a SIGHUP reloads the
config, not the code; a new version needs a restart.
"""

import dataclasses
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable

from . import example_downstream, scheduler, server, watcher, worker
from .config import Config
from .metrics import Publisher, ServiceMetrics

log = logging.getLogger(__name__)

PARENT_CHECK_INTERVAL = 0.5


@dataclasses.dataclass(frozen=True)
class ChildContext:
    """What the wrapper hands a kind's run besides the config: its metrics and the supervisor's sockets."""

    metrics: ServiceMetrics  # this process's counts: the wrapper publishes them
    publisher: Publisher | None  # publishes `metrics` beside the other processes' (None: no metrics directory)
    sockets: dict[str, socket.socket]  # bound by the supervisor before any fork: "api", "downstream" in development


RunChild = Callable[[Config, threading.Event, Callable[[], None], ChildContext], None]  # run(config, stop, ready, context)


@dataclasses.dataclass(frozen=True)
class ChildKind:
    """A kind of child process: how many of it the config wants, and the function one runs."""

    name: str
    run: RunChild
    count: Callable[[Config], int]  # how many the config wants
    serves_on: str | None = None  # the supervisor's socket it accepts on: none is started where there is no such socket
    numbered: bool = False  # named with its number even when alone (worker-1)

    def wanted(self, config: Config, sockets: dict) -> int:
        """How many `config` asks for, from a supervisor holding `sockets`."""
        return self.count(config) if self.can_run(sockets) else 0

    def can_run(self, sockets: dict) -> bool:
        return self.serves_on is None or self.serves_on in sockets

    def child_name(self, number: int) -> str:
        return f"{self.name}-{number}" if self.numbered or number > 1 else self.name


# --- each kind's run ---


def _run_server(config: Config, stop: threading.Event, ready: Callable[[], None], context: ChildContext) -> None:
    # with the publisher, its /metrics adds up what every process publishes
    server.serve(config, context.sockets["api"], stop, ready, counted=context.metrics, publisher=context.publisher)


def _run_watcher(config: Config, stop: threading.Event, ready: Callable[[], None], context: ChildContext) -> None:
    ready()  # it waits for nothing: a round that cannot reach the database is logged, and the next one tries again
    # the host's scheduler: a thread here, as the watcher is one per host and idle between its rounds
    ticks = threading.Thread(target=scheduler.run, args=(config, stop, context.metrics), name="scheduler")
    ticks.start()
    try:
        watcher.run(config, stop, context.metrics)
    finally:
        ticks.join()


def _run_worker(config: Config, stop: threading.Event, ready: Callable[[], None], context: ChildContext) -> None:
    worker.run(config, stop, ready, context.metrics)  # ready once a round has reached the database


def _run_example_downstream(config: Config, stop: threading.Event, ready: Callable[[], None], context: ChildContext) -> None:
    ready()
    user, password = config.users[0]
    api_url = f"http://127.0.0.1:{context.sockets['api'].getsockname()[1]}"
    example_downstream.serve(context.sockets["downstream"], api_url, user, password, stop)


# the order the supervisor starts them in
KINDS: dict[str, ChildKind] = {
    kind.name: kind
    for kind in (
        ChildKind("server", _run_server, count=lambda config: config.servers, serves_on="api"),
        ChildKind("watcher", _run_watcher, count=lambda config: 1),
        ChildKind("worker", _run_worker, count=lambda config: config.workers, numbered=True),
        ChildKind("downstream", _run_example_downstream, count=lambda config: 1, serves_on="downstream"),
    )
}


def wanted_children(config: Config, sockets: dict) -> list[tuple[str, int]]:
    """(kind, number) of every child `config` asks for, given the sockets the supervisor holds."""
    return [(kind.name, number) for kind in KINDS.values() for number in range(1, kind.wanted(config, sockets) + 1)]


def child_main(kind: str, number: int, config: Config, sockets: dict, ready, parent_pid: int, metrics_dir: str | None) -> None:
    """The body of every child process: the common work, once, around its kind's run."""
    stop = _stop_on_sigterm()
    child = KINDS[kind]
    set_process_title(f"jr-{child.child_name(number)}")
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, stop, config.graceful_timeout), daemon=True).start()
    counted = ServiceMetrics()
    publisher = Publisher(counted, metrics_dir) if metrics_dir else None
    try:
        child.run(config, stop, ready.set, ChildContext(counted, publisher, sockets))
    finally:
        if publisher:
            publisher.close()  # the last counts, before the supervisor reaps this process and retires its file
        for sock in sockets.values():
            sock.close()


def child_name(kind: str, number: int) -> str:
    """worker-N; server, then server-2, server-3... when there are several; watcher."""
    return KINDS[kind].child_name(number)


def set_process_title(title: str) -> None:
    """The name `ps -o comm`, top and pstree show (Linux; 15 characters at most)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(title[:15])
    except OSError:
        pass


def _stop_on_sigterm() -> threading.Event:
    """Reset what the fork inherited from the supervisor: its wake-up fd and its handlers."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signals: queue.SimpleQueue = queue.SimpleQueue()
    signal.signal(signal.SIGTERM, lambda signum, frame: signals.put(signum))  # only record it
    stop = threading.Event()
    threading.Thread(target=lambda: (signals.get(), stop.set()), name="sigterm", daemon=True).start()
    # the supervisor blocked signals across the fork: what arrived since is delivered now, to these handlers
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    return stop


def _exit_when_orphaned(parent_pid: int, stop: threading.Event, graceful_timeout: float) -> None:
    """Stop when the supervisor is gone; once stopping, for whatever reason, exit after the graceful timeout.

    The supervisor kills a child whose graceful stop hangs; with no supervisor
    left, this daemon thread does (if the stop finishes first, so much the better).
    """
    while not stop.wait(PARENT_CHECK_INTERVAL):
        if os.getppid() != parent_pid:
            log.warning("the supervisor (pid %d) is gone: stopping", parent_pid)
            stop.set()
    time.sleep(graceful_timeout + PARENT_CHECK_INTERVAL)
    log.error("the graceful stop did not finish within %.0f s: exiting", graceful_timeout)
    os._exit(1)
