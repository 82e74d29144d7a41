"""A primary and a streaming standby on this machine, for the failover tests.

Each node is a LocalPostgres (the machine's PostgreSQL binaries, run as `postgres` when
root) in its own data and socket directories. The standby is a copy taken with
`pg_basebackup -R`, so it streams from the primary and is promoted by `pg_ctl promote`.
"""

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from psycopg.conninfo import make_conninfo

from jobrunner import store
from jobrunner.localdb import LocalPostgres

SETTINGS = {"fsync": "off", "full_page_writes": "off", "max_connections": "200", "wal_level": "replica"}


class Node(LocalPostgres):
    def crash(self) -> None:
        """Stop at once, as a power cut would: no shutdown checkpoint, connections cut."""
        self._run("pg_ctl", "stop", "--wait", "--silent", "-m", "immediate", "-D", str(self.datadir))
        self.running = False
        self._unlock()

    def promote(self) -> None:
        self._run("pg_ctl", "promote", "--wait", "--silent", "-D", str(self.datadir))

    def clone_standby(self, datadir: Path, settings: dict[str, str]) -> "Node":
        """A streaming standby of this (running) node in `datadir`, started, with `settings` over the copied ones."""
        datadir.mkdir()
        self._give_to_server_user(datadir)
        self._run("pg_basebackup", "-D", str(datadir), "-R", "-X", "stream", "-c", "fast", "-h", self.socket_dir, "-p", "5432", "-U", "jobrunner")
        with open(datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# the standby's own\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        standby = Node(datadir)
        standby.start()
        return standby


class Pair:
    """A primary (`a`) and its standby (`b`); `url` lists both, for whichever is read-write."""

    def __init__(self, synchronous: bool):
        self.workdir = Path(tempfile.mkdtemp(prefix="jobrunner-failover-"))
        self.workdir.chmod(0o755)  # as root, the clusters run as `postgres`, which must reach their directories
        self.a = Node(self.workdir / "a", settings={**SETTINGS, "synchronous_commit": "on"})
        self.a.start()
        with contextlib.closing(store.connect(self.a.url())) as conn:
            conn.execute("CREATE DATABASE jobs")
        self.b = self.a.clone_standby(self.workdir / "b", {})
        if synchronous:
            self._wait_for_synchronous_standby()

    def _wait_for_synchronous_standby(self) -> None:
        """Commits on `a` wait for `b` from now on (set only now: before `b` streams, a commit would wait for ever).
        Only on `a`: promoted, `b` stands alone, and waiting for a standby of its own would block every commit."""
        with contextlib.closing(store.connect(self.a.url())) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone()[0] == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the standby did not become synchronous")
                time.sleep(0.02)

    def url(self, target_session_attrs: str = "read-write") -> str:
        return make_conninfo(self.a.url("jobs"), host=f"{self.a.socket_dir},{self.b.socket_dir}", target_session_attrs=target_session_attrs)

    def direct(self, node: Node) -> str:
        return node.url("jobs")

    def stop(self) -> None:
        for node in (self.a, self.b):
            node.stop()
            shutil.rmtree(node.socket_dir, ignore_errors=True)  # a crashed node's is left
        shutil.rmtree(self.workdir, ignore_errors=True)
