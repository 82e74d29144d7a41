"""API tokens instead of configured passwords: a custom Authorizer, and the API served by the application.

Each client of the API has a name and a token, listed in the file $API_TOKENS_FILE:

    # client   token                                      (disabled: known, but refused)
    billing    b3Jk3vV0x2cQq9Yw1mJ8fT4sZr6nL0pA
    reports    Qm9uZ2lsZS1yZXBvcnRzLXRva2VuLTIwMjQ     disabled

A client sends them as HTTP Basic credentials: user = client name, password = token.
A wrong or unknown pair gets 401, a disabled client 403.

Used two ways (docs/library.md):

- named in the configuration, `authorizer = token_auth:from_config` (or
  JOBRUNNER_AUTHORIZER), by `jobrunner run` or `jobrunner.run(config)`;
- given to `jobrunner.server.build(config, authorizer=...)`, as main() does: the
  API alone, in this process, until SIGTERM or Ctrl-C:

    DATABASE_URL=postgresql:///jobs API_TOKENS_FILE=tokens.txt python examples/token_auth.py
"""

import hashlib
import hmac
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Mapping

import jobrunner
from jobrunner import server

log = logging.getLogger("token_auth")


def _digest(token: str) -> bytes:
    # compared as digests: the same length whatever was sent, and no token kept in memory
    return hashlib.sha256(token.encode()).digest()


class TokenAuthorizer:
    """An Authorizer: client name -> (digest of its token, enabled)."""

    def __init__(self, clients: Mapping[str, tuple[bytes, bool]]):
        self._clients = dict(clients)
        self._nobody = _digest("")  # compared for an unknown client too, so that timing does not tell who exists

    def authorize(self, user: str, password: str) -> None:
        digest, enabled = self._clients.get(user, (None, False))
        matches = hmac.compare_digest(_digest(password), digest or self._nobody)
        if digest is None or not matches:
            raise jobrunner.Unauthorized("Unknown client or wrong token")
        if not enabled:
            raise jobrunner.Forbidden(f"Client {user!r} is disabled")


def load_tokens(path: str) -> dict[str, tuple[bytes, bool]]:
    """The clients in a tokens file: `name token [disabled]` a line (no spaces or # in a token); blank lines and # comments ignored."""
    clients = {}
    with open(path) as file:
        for number, line in enumerate(file, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) not in (2, 3) or words[2:] not in ([], ["disabled"]):
                raise ValueError(f"{path}, line {number}: must be `name token` or `name token disabled`")
            clients[words[0]] = (_digest(words[1]), len(words) == 2)
    return clients


def from_config(config: jobrunner.Config) -> TokenAuthorizer:
    """The factory for `authorizer = token_auth:from_config`: jobrunner calls it in its server process."""
    return TokenAuthorizer(load_tokens(os.environ["API_TOKENS_FILE"]))


def main() -> int:
    try:
        config = jobrunner.load_config(os.environ)
        authorizer = TokenAuthorizer(load_tokens(os.environ["API_TOKENS_FILE"]))
    except KeyError:
        print("token_auth: set API_TOKENS_FILE to the file of client names and tokens", file=sys.stderr)
        return 2
    except (jobrunner.ConfigError, OSError, ValueError) as error:
        print(f"token_auth: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # it warns at each reconnect

    # The handlers only record the signal; the main thread acts on it.
    signals: queue.SimpleQueue = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: signals.put(signum))
    try:
        api = server.build(config, authorizer=authorizer)  # binds config.host:config.port
    except OSError as error:
        print(f"token_auth: cannot listen on {config.host}:{config.port}: {error.strerror}", file=sys.stderr)
        return 2
    accepting = threading.Thread(target=api.serve_forever, name="api")
    accepting.start()
    log.info("serving the API on %s:%d", *api.server_address[:2])
    signals.get()
    log.info("stopping: finishing the requests in flight")
    api.stop()  # stop accepting, close idle connections, wait for requests in flight, close the database pool
    accepting.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
