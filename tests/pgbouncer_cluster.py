"""A private PgBouncer in front of the test cluster: its own config, a loopback port, one pool mode.

The machine's pgbouncer (Debian's package: scripts/ensure-pgbouncer installs it) runs
in the foreground as a child of the test process. It refuses to run as root, so as
root it runs as `postgres`, the user that runs the throwaway cluster and so can reach
its socket directory. Clients authenticate to PgBouncer as the cluster's own users
do to the cluster (trust, or the URL's password); PgBouncer logs in to the cluster
as the client's user.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo


def find_pgbouncer() -> str | None:
    """The pgbouncer binary: on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("pgbouncer") or next((path for path in ("/usr/sbin/pgbouncer",) if os.access(path, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PgBouncer:
    """One pgbouncer process in `pool_mode` ("transaction" or "session") in front of the server of `server_url`."""

    def __init__(self, server_url: str, pool_mode: str, pool_size: int = 40):
        self.server = conninfo_to_dict(server_url)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"jobrunner-pgbouncer-{pool_mode}-"))
        self.process: subprocess.Popen | None = None
        self._run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def url(self, database_url: str) -> str:
        """`database_url` (a database on the cluster) reached through this PgBouncer."""
        return make_conninfo(database_url, host="127.0.0.1", port=str(self.port))

    def start(self) -> "PgBouncer":
        self._write_config()
        self.process = subprocess.Popen(
            [find_pgbouncer(), str(self.workdir / "pgbouncer.ini")],
            user=self._run_as.pw_name if self._run_as else None, cwd="/",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start ({self.process.poll()}): {self.log()[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        path = self.workdir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _write_config(self) -> None:
        user = self.server.get("user") or "postgres"
        password = self.server.get("password", "")
        # the fallback database `*`: every database on the cluster, as the client names it
        target = f"host={self.server.get('host', 'localhost')} port={self.server.get('port', '5432')}"
        config = f"""\
[databases]
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pool_mode = {self.pool_mode}
auth_type = {'md5' if password else 'trust'}
auth_file = {self.workdir / 'userlist.txt'}
max_client_conn = 1000
default_pool_size = {self.pool_size}
logfile = {self.workdir / 'pgbouncer.log'}
log_connections = 0
log_disconnections = 0
"""
        (self.workdir / "pgbouncer.ini").write_text(config)
        (self.workdir / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        if self._run_as is not None:
            os.chmod(self.workdir, 0o700)
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
