"""The supervisor: the parent process that owns the config, the listening socket and the children.

It binds the socket, forks (multiprocessing, fork context) the children the
config wants of each kind in children.KINDS (JOBRUNNER_SERVERS servers, all
accepting on that socket, one watcher, N workers), replaces children that die,
reloads on SIGHUP and stops gracefully on SIGTERM: it spawns, reaps and reloads
generations; what a child does is its kind's business (children.py). Signal
handlers only record the signal; the loop acts. The loop waits on the
children's sentinels and a wake-up pipe, so it sleeps until something happens.

| signal  | supervisor                                                          |
|---------|---------------------------------------------------------------------|
| HUP     | re-read the config; if valid start a new generation, retire the old |
|         | once it is ready (the loop goes on meanwhile: a TERM is not delayed) |
| TERM    | graceful stop (a second TERM, or INT, stops fast)                  |
| INT     | graceful stop; the second stops fast                               |
| QUIT    | fast stop: children are killed; their jobs wait in the database    |
| TTIN    | one worker more                                                     |
| TTOU    | one worker less                                                     |
"""

import dataclasses
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for
from pathlib import Path

from . import metrics
from .children import KINDS, child_main, child_name, set_process_title, wanted_children
from .config import Config, ConfigError, changes_needing_restart
from .systemd import Notifier

log = logging.getLogger(__name__)

QUICK_DEATH = 5.0  # a child that dies sooner than this after starting has failed to start
MAX_QUICK_DEATHS = 5  # in a row, before the supervisor gives up
MAX_RESTART_DELAY = 30.0
SIGNALS = {
    signal.SIGHUP: "hup",
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
}


class GiveUp(Exception):
    """A child keeps dying at start: the supervisor stops and exits non-zero."""


@dataclasses.dataclass
class Child:
    kind: str  # a name in children.KINDS
    number: int
    generation: int
    process: multiprocessing.Process
    ready: object  # a multiprocessing Event the child sets once it is serving
    started: float
    retiring_since: float | None = None
    killed: bool = False  # SIGKILLed after its graceful timeout: said and done once

    @property
    def name(self) -> str:
        return child_name(self.kind, self.number)


@dataclasses.dataclass
class PendingReload:
    """A generation started by SIGHUP that is not ready yet: the running one serves until it is."""

    generation: int
    config: Config
    size: int  # how many children it has: fewer means one died
    deadline: float  # past it, the reload is abandoned


class Supervisor:
    def __init__(self, config: Config, sockets: dict[str, socket.socket], reload_config: Callable[[], Config], notifier: Notifier):
        self.config = config
        self.sockets = sockets  # "api" (and "downstream" in development), bound before any fork
        self.reload_config = reload_config
        self.notifier = notifier
        self.context = multiprocessing.get_context("fork")
        self.children: list[Child] = []
        self.generation = 0  # the generation serving now
        self.reloading: PendingReload | None = None
        self.reload_again = False  # a SIGHUP came while a reload was pending
        self.quick_deaths: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}
        self.stopping: str | None = None  # "graceful" or "fast"
        self.signals: list[int] = []
        self._wake_read, self._wake_write = os.pipe()
        self._last_watchdog = 0.0
        self.metrics = metrics.ServiceMetrics()  # restarts and reloads; the children count the rest
        self.metrics_dir: str | None = None  # where every process publishes its metrics, for the servers to add up
        self.publisher: metrics.Publisher | None = None  # ours, written on each event (no thread of ours runs across a fork)

    # --- the main loop ---

    def run(self) -> int:
        try:
            # systemd's RuntimeDirectory= (/run/jobrunner) when there is one: no tmp cleaner ages it
            self.metrics_dir = tempfile.mkdtemp(prefix="jobrunner-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY"))
        except OSError as error:
            log.warning("no directory for the metrics (%s): each server's /metrics will show its own process only", error)
        try:
            return self._run()
        finally:
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _run(self) -> int:
        # every label an alert watches is there from the start, at 0: increase() cannot see a series' first sample
        for kind in KINDS.values():
            if kind.can_run(self.sockets):
                self.metrics.restarts.inc(kind.name, amount=0)
        for result in ("ok", "rejected", "failed"):
            self.metrics.reloads.inc(result, amount=0)
        if self.metrics_dir:
            self.publisher = metrics.Publisher(self.metrics, self.metrics_dir, every=None)
            self.publisher.publish()
        set_process_title("jr-supervisor")
        self._install_signal_handlers()
        self.generation = 1
        for kind, number in self.wanted(self.config):
            self.spawn(kind, number, self.config, self.generation)
        announced = False
        try:
            while self.stopping is None:
                self.sleep()
                self.handle_signals()
                self.reap_children()
                if self.stopping:
                    break  # a stop signal in this pass: start nothing more, not even a reload's children
                self.advance_reload()
                self.manage_children()
                self.ping_watchdog()
                if not announced and all(child.ready.is_set() for child in self.current()):
                    # READY=1 once every child has started and reached the database
                    self.notifier.ready(self.status())
                    log.info("supervisor %d: %s", os.getpid(), self.status())
                    announced = True
        except GiveUp as error:
            log.error("%s; stopping", error)
            self.stop(graceful=True)
            return 1
        self.stop(graceful=self.stopping == "graceful")
        return 0

    def sleep(self) -> None:
        """Until a child exits, a signal arrives, a restart is due, or a watchdog ping is."""
        deadlines = [*self.restart_at.values(), time.monotonic() + 0.1 if self._starting() else time.monotonic() + 1.0]
        deadlines += [child.retiring_since + self.config.graceful_timeout for child in self._retiring() if not child.killed]
        if self.notifier.watchdog_interval:
            deadlines.append(self._last_watchdog + self.notifier.watchdog_interval)
        timeout = max(0.0, min(deadlines) - time.monotonic())
        ready = wait_for([self._wake_read, *(child.process.sentinel for child in self.children)], timeout)
        if self._wake_read in ready:
            os.read(self._wake_read, 1024)

    def handle_signals(self) -> None:
        while self.signals:
            getattr(self, "handle_" + SIGNALS[self.signals.pop(0)])()

    # --- signals (the handlers only recorded them) ---

    def handle_hup(self) -> None:
        self.reload()

    def handle_term(self) -> None:
        self.stopping = "graceful"

    def handle_int(self) -> None:
        self.stopping = "graceful"

    def handle_quit(self) -> None:
        self.stopping = "fast"

    def handle_ttin(self) -> None:
        if not self.config.downstream_url and not self.config.default_worker:
            log.error("SIGTTIN: no DOWNSTREAM_URL (downstream_url) to send jobs to; no worker added")
            return
        self.config = dataclasses.replace(self.config, workers=self.config.workers + 1)
        log.info("SIGTTIN: %d workers", self.config.workers)

    def handle_ttou(self) -> None:
        self.config = dataclasses.replace(self.config, workers=max(0, self.config.workers - 1))
        log.info("SIGTTOU: %d workers", self.config.workers)

    # --- children ---

    def current(self) -> list[Child]:
        """The serving generation's children (not those retiring, nor those of a pending reload)."""
        return [child for child in self.children if child.retiring_since is None and not self._is_pending(child)]

    def pending(self) -> list[Child]:
        """The children of the reload that is not ready yet."""
        return [child for child in self.children if child.retiring_since is None and self._is_pending(child)]

    def _is_pending(self, child: Child) -> bool:
        return self.reloading is not None and child.generation == self.reloading.generation

    def _retiring(self) -> list[Child]:
        return [child for child in self.children if child.retiring_since is not None]

    def wanted(self, config: Config) -> list[tuple[str, int]]:
        """The children `config` asks for: (kind, number) of each."""
        return wanted_children(config, self.sockets)

    def spawn(self, kind: str, number: int, config: Config, generation: int) -> Child:
        ready = self.context.Event()
        name = child_name(kind, number)
        process = self.context.Process(
            target=child_main,
            name=name,
            args=(kind, number, config, self.sockets, ready, os.getpid(), self.metrics_dir),
            daemon=False,
        )
        # Signals stay pending until the child has its own handlers (it unblocks them):
        # a SIGTERM in between must not meet the supervisor's handler in the child.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        gc.collect()  # what is garbage now must not be frozen for ever
        gc.freeze()  # the child's collections then never write to (and so copy) the pages of objects it inherits
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child = Child(kind, number, generation, process, ready, time.monotonic())
        self.children.append(child)
        if generation == self.generation:
            self.restart_at.pop(child.name, None)
        return child

    def reap_children(self) -> None:
        for child in list(self.children):
            code = child.process.exitcode
            if code is None:
                continue
            self.children.remove(child)
            pid = child.process.pid
            child.process.close()
            if self.metrics_dir:
                metrics.retire(Path(self.metrics_dir), pid)  # its counts stay in the totals
            if child.retiring_since is not None or self.stopping:
                continue
            if self._is_pending(child):
                log.warning("%s of the new generation (pid %d) exited with code %s", child.name, pid, code)
                continue  # not restarted: advance_reload abandons the reload
            lived = time.monotonic() - child.started
            if lived < QUICK_DEATH:
                deaths = self.quick_deaths[child.name] = self.quick_deaths.get(child.name, 0) + 1
                if deaths >= MAX_QUICK_DEATHS:
                    raise GiveUp(f"{child.name} died {deaths} times within {QUICK_DEATH:.0f} s of starting (last exit code {code})")
                delay = min(0.5 * 2 ** (deaths - 1), MAX_RESTART_DELAY)
            else:
                self.quick_deaths[child.name] = 0
                delay = 0.0
            log.warning("%s (pid %d) exited with code %s; restarting it in %.1f s", child.name, pid, code, delay)
            self.restart_at[child.name] = time.monotonic() + delay
            self._count(self.metrics.restarts, child.kind)

    def manage_children(self) -> None:
        """Start what is missing (when its restart is due) and retire workers beyond the count."""
        running = {child.name: child for child in self.current()}
        now = time.monotonic()
        for kind, number in self.wanted(self.config):
            name = child_name(kind, number)
            if name not in running and self.restart_at.get(name, 0.0) <= now:
                self.spawn(kind, number, self.config, self.generation)
        wanted = {child_name(kind, number) for kind, number in self.wanted(self.config)}
        for child in self.current():
            if child.name not in wanted:
                self.retire(child)
        self.restart_at = {name: at for name, at in self.restart_at.items() if name in wanted}
        self.kill_overdue(now)

    def kill_overdue(self, now: float) -> None:
        """SIGKILL retiring children past the graceful timeout, once each: the loop may pass here
        many times before the kernel has finished one off and its exit can be reaped."""
        for child in self._retiring():
            if not child.killed and now - child.retiring_since > self.config.graceful_timeout:
                log.warning("%s did not stop within %.0f s: killing it", child.name, self.config.graceful_timeout)
                _kill(child, signal.SIGKILL)
                child.killed = True

    def retire(self, child: Child) -> None:
        """Graceful stop of one child: it finishes what it is doing, then exits."""
        child.retiring_since = time.monotonic()
        _kill(child, signal.SIGTERM)

    # --- reload and stop ---

    def reload(self) -> None:
        """Start a new generation with the re-read config; advance_reload retires the old one once it is ready."""
        if self.reloading:
            log.info("SIGHUP: a reload is under way; the next one starts when it ends")
            self.reload_again = True
            return
        new = self._read_new_config()
        if new is None:
            return
        self.notifier.reloading()
        generation = self.generation + 1
        wanted = self.wanted(new)
        self.reloading = PendingReload(generation, new, len(wanted), time.monotonic() + new.start_timeout)
        for kind, number in wanted:
            self.spawn(kind, number, new, generation)

    def _read_new_config(self) -> Config | None:
        """The config to reload with, or None (logged and counted) to keep the running one."""
        try:
            new = self.reload_config()
        except ConfigError as error:
            log.error("SIGHUP: the new configuration is invalid, keeping the running one: %s", error)
            self._count(self.metrics.reloads, "rejected")
            return None
        except Exception:  # a bug in reading it must not stop the supervisor either
            log.exception("SIGHUP: could not read the new configuration, keeping the running one")
            self._count(self.metrics.reloads, "rejected")
            return None
        kept = changes_needing_restart(self.config, new)
        if kept:
            log.warning("SIGHUP: %s can only change with a restart; keeping the running value", ", ".join(kept))
            new = dataclasses.replace(new, **{name: getattr(self.config, name) for name in kept})
        return new

    def advance_reload(self) -> None:
        """Finish a pending reload once its generation is ready; abandon it if a child died or time ran out."""
        if self.reloading is None:
            return
        starting = self.pending()
        if len(starting) == self.reloading.size and all(child.ready.is_set() for child in starting):
            old = self.current()
            self.config, self.generation = self.reloading.config, self.reloading.generation
            self.reloading = None
            self.restart_at.clear()  # every name has a child of the new generation
            for child in old:
                self.retire(child)
            log.info("SIGHUP: reloaded (generation %d)", self.generation)
            self._count(self.metrics.reloads, "ok")
        elif len(starting) < self.reloading.size or time.monotonic() > self.reloading.deadline:
            log.error("SIGHUP: the new generation did not start and reach the database; keeping the old one")
            for child in starting:
                self.retire(child)
            self.reloading = None
            self._count(self.metrics.reloads, "failed")
        else:
            return
        self.notifier.ready(self.status())
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def stop(self, graceful: bool) -> None:
        self.notifier.stopping()
        log.info("stopping %s", "gracefully" if graceful else "fast")
        if self.reloading:
            log.info("abandoning the pending reload (generation %d)", self.reloading.generation)
            self.reloading = None
        for child in self.children:
            _kill(child, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + (self.config.graceful_timeout if graceful else 5.0)
        while self.children and time.monotonic() < deadline:
            ready = wait_for([self._wake_read, *(child.process.sentinel for child in self.children)], deadline - time.monotonic())
            if self._wake_read in ready:
                os.read(self._wake_read, 1024)
            self.children = [child for child in self.children if child.process.exitcode is None]
            if graceful and set(self.signals) & {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}:
                self.signals.clear()  # a second TERM or INT, or a QUIT: stop fast
                log.info("second signal: stopping fast")
                for child in self.children:
                    _kill(child, signal.SIGKILL)
        for child in self.children:
            log.warning("%s did not stop within the graceful timeout: killing it", child.name)
            _kill(child, signal.SIGKILL)
            child.process.join(5)

    def _count(self, counter: metrics.Counter, label: str) -> None:
        """Count a supervisor event and publish at once: these are rare."""
        counter.inc(label)
        if self.publisher:
            self.publisher.publish()

    def _starting(self) -> bool:
        return self.reloading is not None or not all(child.ready.is_set() for child in self.current())

    def status(self) -> str:
        return f"{self.config.servers} servers, {self.config.workers} workers, generation {self.generation}, listening on {self.sockets['api'].getsockname()[1]}"

    def ping_watchdog(self) -> None:
        now = time.monotonic()
        if self.notifier.watchdog_interval and now - self._last_watchdog >= self.notifier.watchdog_interval:
            self.notifier.watchdog()
            self._last_watchdog = now

    def _install_signal_handlers(self) -> None:
        os.set_blocking(self._wake_write, False)
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)  # NO LOGGING, just record the signal (the wake-up fd wakes the loop)


def _kill(child: Child, signum: int) -> None:
    try:
        os.kill(child.process.pid, signum)
    except (ProcessLookupError, TypeError):
        pass

