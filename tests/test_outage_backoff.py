"""A database that refuses at once (a standby, a read-only setting) is asked again with back-off, not in a loop."""

import threading

from conftest import free_port, make_type, new_id, running_worker, wait_until

from jobrunner import services


def rollbacks(conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def test_a_worker_whose_claims_are_refused_at_once_backs_off(db_url, conn):
    make_type(conn, "email")
    services.enqueue(conn, new_id(), "email", {})  # due now: the worker wants to claim it
    database = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    try:
        with running_worker(db_url, f"http://127.0.0.1:{free_port()}", sleep_factor=1):
            start = rollbacks(conn)
            wait_until(lambda: rollbacks(conn) > start, "the worker's first refused claim", timeout=15)
            first = rollbacks(conn)
            threading.Event().wait(3.0)  # a window to count in, not a wait for a condition
            refused = rollbacks(conn) - first
    finally:
        conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    # 10 ms doubling up to ~10 s (sleep_factor 1 keeps the idle poll steady, not the back-off):
    # about 9 tries in 3 s; a loop without back-off makes hundreds a second
    assert refused < 40, f"{refused} refused transactions in 3 s"


def test_healthz_is_unavailable_while_the_database_takes_no_writes(api, conn):
    """A standby, or default_transaction_read_only: the host can do nothing, and a load balancer must know it."""
    assert api.get("/healthz", auth=None).status == 200
    database = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    try:
        # new sessions only: the server's pooled connections keep their setting until replaced
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        # (the terminated connections alone give one 503; a read-only database must give nothing else)
        wait_until(lambda: [api.get("/healthz", auth=None).status for _ in range(3)] == [503] * 3, "healthz to say 503 for good")
        assert api.get("/healthz", auth=None).json["id"] == "service_unavailable"
    finally:
        conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
