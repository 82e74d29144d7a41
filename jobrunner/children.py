"""What runs in each child process the supervisor forks: signals reset, a name, then the child's own loop.

The supervisor imports this module, never the other way round: the names of
children and processes live here.

A child stops gracefully on SIGTERM (from the supervisor), ignores the signals
that belong to the supervisor (SIGINT from a terminal's Ctrl-C reaches the
whole process group; SIGHUP, SIGTTIN, SIGTTOU), and exits by itself when its
parent is gone.
"""

import logging
import os
import queue
import signal
import threading
import time

log = logging.getLogger(__name__)

PARENT_CHECK_INTERVAL = 0.5


def child_main(kind: str, number: int, config, sockets: dict, ready, parent_pid: int, metrics_dir: str | None) -> None:
    stop = _stop_on_sigterm()
    set_process_title(f"jr-{child_name(kind, number)}")
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, stop, config.graceful_timeout), daemon=True).start()
    if kind == "server":
        from . import server

        server.serve(config, sockets["api"], stop, ready=ready.set, metrics_dir=metrics_dir)
    elif kind == "worker":
        from . import worker

        worker.run(config, stop, ready=ready.set, metrics_dir=metrics_dir)
    elif kind == "watcher":
        from . import watcher

        ready.set()
        watcher.run(config, stop, metrics_dir)
    elif kind == "downstream":
        from . import example_downstream

        ready.set()
        user, password = config.users[0]
        example_downstream.serve(sockets["downstream"], f"http://127.0.0.1:{sockets['api'].getsockname()[1]}", user, password, stop)
    for sock in sockets.values():
        sock.close()


def child_name(kind: str, number: int) -> str:
    """worker-N; server, then server-2, server-3... when there are several; watcher."""
    return f"{kind}-{number}" if kind == "worker" or number > 1 else kind


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
