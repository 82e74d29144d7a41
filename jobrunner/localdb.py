"""A private PostgreSQL cluster, started from the machine's initdb/pg_ctl.

Used by `jobrunner run` when DATABASE_URL is unset (development, a first run) and
by the test suite. It listens only on a Unix socket in a private directory and
trusts local connections, so it must never hold anything that matters.
"""

import fcntl
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "jobrunner"
DATABASE = "postgres"
# Socket only: the port just names the socket file in our private directory.
PORT = 5432
INSTALL_HINT = "install the PostgreSQL server, e.g. `apt-get install postgresql`"


class LocalPostgresError(Exception):
    pass


def find_server_binary(name: str) -> str:
    """Find initdb/pg_ctl on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0, reverse=True)
    if not candidates:
        raise LocalPostgresError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin: {INSTALL_HINT}")
    return candidates[0]


class LocalPostgres:
    """One cluster in `datadir`. `settings` are extra postgresql.conf lines written at initdb."""

    def __init__(self, datadir: Path, settings: dict[str, str] | None = None):
        self.datadir = Path(datadir).resolve()
        self.settings = settings or {}
        self.socket_dir: str | None = None
        self.running = False
        self._lock_file = None  # held while this process runs the cluster
        # initdb and postgres refuse to run as root: run them as `postgres` then.
        self._run_as = _server_user() if os.geteuid() == 0 else None

    def url(self, dbname: str = DATABASE) -> str:
        if self.socket_dir is None:
            raise LocalPostgresError("the local PostgreSQL has not been started")
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}&port={PORT}"

    def start(self) -> str:
        """Initialise the cluster if needed, start it, and return its URL."""
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        self._lock()
        self.stop_leftover()
        # A restart keeps the same socket directory, so the URL stays valid.
        if self.socket_dir is None:
            self.socket_dir = tempfile.mkdtemp(prefix="jobrunner-pg-")
        else:
            os.makedirs(self.socket_dir, exist_ok=True)
        self._give_to_server_user(self.socket_dir)
        self.running = True
        self._run(
            "pg_ctl", "start", "--wait", "--silent", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"),
            "-o", f"-k {self.socket_dir} -p {PORT}",
        )
        return self.url()

    def stop(self) -> None:
        if not self.running:
            return
        try:
            self._run("pg_ctl", "stop", "--wait", "--silent", "-m", "fast", "-D", str(self.datadir))
        finally:
            self.running = False
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self._unlock()

    def stop_leftover(self) -> None:
        """Stop a cluster in our data dir that outlived the process that started it (killed with -9):
        `pg_ctl start` would refuse ("another server might be running"). Stopped and started
        again, not adopted: one way to start, and a socket directory this process made."""
        pid_file = self.datadir / "postmaster.pid"
        if not pid_file.exists() or self._run("pg_ctl", "status", "-D", str(self.datadir), check=False) != 0:
            return  # nothing left, or a stale pid file postgres itself sees through
        lines = pid_file.read_text(errors="replace").splitlines()
        self._run("pg_ctl", "stop", "--wait", "--silent", "-m", "fast", "-D", str(self.datadir))
        leftover_socket_dir = Path(lines[4]) if len(lines) > 4 else None
        if leftover_socket_dir and leftover_socket_dir.parent == Path(tempfile.gettempdir()) and leftover_socket_dir.name.startswith("jobrunner-pg-"):
            shutil.rmtree(leftover_socket_dir, ignore_errors=True)

    def _lock(self) -> None:
        """A lock beside the data dir tells a cluster left by a crash from one another process runs.

        A POSIX record lock: held by this process only (the children it forks do not
        inherit it) and released when it exits, however it exits.
        """
        if self._lock_file is not None:
            return
        lock_file = open(self.datadir.with_name(self.datadir.name + ".lock"), "a")
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise LocalPostgresError(f"another process runs the private database in {self.datadir}; stop it first") from None
        self._lock_file = lock_file

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _initdb(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._give_to_server_user(self.datadir)
        self._run(
            "initdb", "--no-sync", "--auth=trust", "--encoding=UTF8", "--no-locale",
            f"--username={SUPERUSER}", "-D", str(self.datadir),
        )
        lines = ["listen_addresses = ''"] + [f"{key} = {value}" for key, value in self.settings.items()]
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# jobrunner's private cluster\n" + "\n".join(lines) + "\n")

    def _give_to_server_user(self, path: str | Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
            os.chmod(path, 0o700)

    def _run(self, program: str, *args: str, check: bool = True) -> int:
        """Run a PostgreSQL program; its exit status, or (with `check`) LocalPostgresError unless 0."""
        command = [find_server_binary(program), *args]
        user = self._run_as.pw_name if self._run_as else None
        result = subprocess.run(command, user=user, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            log = self.datadir / "server.log"
            if log.exists():
                output += "\n" + log.read_text(errors="replace")[-2000:]
            raise LocalPostgresError(f"{program} failed ({result.returncode}): {output}")
        return result.returncode


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise LocalPostgresError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user: "
            f"run as another user, or {INSTALL_HINT} (which creates it)"
        ) from None
