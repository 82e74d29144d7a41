"""Schema versions: the migrations this code knows, which ones a database has, applying the missing ones.

A migration is a file jobrunner/migrations/NNNN_short_name.sql, shipped in the
package. `jobrunner migrate` applies the missing ones in order of their number,
each in a transaction of its own under the schema's advisory lock, and records it
in jobrunner_schema_migrations; a kill between two leaves the first applied and
recorded, and the next `migrate` goes on from there. `run`, `serve` and `work`
call `check`, which refuses a database that is behind this code or ahead of it.
Adding a migration is adding a file (and its objects to schema.sql); a file, once
released, is never renamed, renumbered or edited: databases record it by number and name.
A file runs inside its transaction, so it has no COMMIT of its own, and nothing that
cannot run in one (CREATE INDEX CONCURRENTLY); new columns on Rickover's tables are
nullable or defaulted, because Rickover's INSERTs name their columns.
"""

import dataclasses
import re
from collections.abc import Callable
from datetime import datetime
from importlib import resources

from . import store
from .errors import SchemaMissing, SchemaTooNew

FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclasses.dataclass(frozen=True, order=True)
class Migration:
    version: int
    name: str
    sql: str = dataclasses.field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return label(self.version, self.name)


@dataclasses.dataclass(frozen=True)
class Status:
    applied: dict[int, tuple[str, datetime]]  # {version: (name, applied_at)}, as the database records them
    pending: tuple[Migration, ...]  # known to this code, not applied yet
    unknown: tuple[str, ...]  # labels of versions applied that this code does not know


def label(version: int, name: str) -> str:
    return f"{version:04d}_{name}"


def known() -> tuple[Migration, ...]:
    """Every migration shipped with this code, in order; a misnamed file or a number used twice is a packaging bug."""
    migrations = []
    for file in resources.files(__package__).joinpath("migrations").iterdir():
        if not file.name.endswith(".sql"):
            continue
        match = FILE_NAME.fullmatch(file.name)
        if not match:
            raise RuntimeError(f"jobrunner/migrations/{file.name}: a migration is named NNNN_short_name.sql")
        migrations.append(Migration(int(match[1]), match[2], file.read_text()))
    migrations.sort()
    for before, after in zip(migrations, migrations[1:]):
        if before.version == after.version:
            raise RuntimeError(f"jobrunner/migrations: {before.label} and {after.label} share a number")
    return tuple(migrations)


def status(conn: store.Connection) -> Status:
    """What the database has, against what this code knows."""
    migrations = known()
    applied = store.schema_migrations(conn) or {}
    # a number recorded under another name is unknown too: another branch's migration, not this one
    names = {migration.version: migration.name for migration in migrations}
    return Status(
        applied=applied,
        pending=tuple(migration for migration in migrations if migration.version not in applied),
        unknown=tuple(label(version, name) for version, (name, _) in applied.items() if names.get(version) != name),
    )


def check(conn: store.Connection) -> None:
    """Refuse a database whose schema is not the one this code needs, naming what to do."""
    state = status(conn)
    if state.unknown:
        raise _too_new(state.unknown)
    if not state.applied:
        raise SchemaMissing("The database has no jobrunner schema version (no jobrunner_schema_migrations): run `jobrunner migrate`")
    if state.pending:
        missing = ", ".join(migration.label for migration in state.pending)
        raise SchemaMissing(f"The database's schema is older than this jobrunner needs (missing migrations {missing}): run `jobrunner migrate`")


def apply(conn: store.Connection, applied: Callable[[Migration], None] = lambda migration: None) -> list[Migration]:
    """Apply the migrations the database lacks, in order; the ones this call applied (none when up to date).

    `applied(migration)` is called as each one commits, so a failure later still leaves a
    report of what was done.
    """
    state = status(conn)
    if state.unknown:
        raise _too_new(state.unknown)
    # up to date: not even the lock. Otherwise one transaction each, and each looks
    # again under the lock: another `migrate` may have applied it meanwhile
    done = []
    for migration in state.pending:
        if _apply_one(conn, migration):
            done.append(migration)
            applied(migration)
    return done


def _apply_one(conn: store.Connection, migration: Migration) -> bool:
    """Apply one migration unless another process did while this one waited for the lock."""
    with store.transaction(conn):
        store.lock_schema(conn)
        state = status(conn)
        if state.unknown:
            raise _too_new(state.unknown)
        if migration.version in state.applied:
            return False
        store.apply_migration(conn, migration.version, migration.name, migration.sql)
    return True


def _too_new(unknown: tuple[str, ...]) -> SchemaTooNew:
    return SchemaTooNew(
        f"The database's schema is newer than this jobrunner: it has migrations {', '.join(unknown)} that this "
        "version does not know. Upgrade jobrunner to the version that applied them"
    )
