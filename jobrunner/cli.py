"""The `jobrunner` command line."""

import argparse
import os
import sys
from importlib import resources

from . import store
from .errors import JobrunnerError


def schema_sql() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text()


def migrate(database_url: str) -> None:
    conn = store.connect(database_url)
    try:
        store.apply_schema(conn, schema_sql())
    finally:
        conn.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobrunner", description="A Postgres-backed job queue.")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_cmd = commands.add_parser("migrate", help="apply schema.sql to the database (idempotent)")
    migrate_cmd.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL (default: $DATABASE_URL)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "migrate":
            if not args.database_url:
                print("jobrunner migrate: DATABASE_URL is not set (or pass --database-url)", file=sys.stderr)
                return 2
            migrate(args.database_url)
            print("jobrunner: schema applied")
    except JobrunnerError as error:
        print(f"jobrunner {args.command}: {error}", file=sys.stderr)
        return 1
    return 0
