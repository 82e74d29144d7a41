"""Every command in the docs' ```sh blocks is run, or checked where it would change the host, so the docs cannot rot.

Runnable blocks run in document order, with bash -e, against `jobrunner run` in
development mode (its own PostgreSQL and example downstream) in a scratch
directory, with the environment the docs assume: JOBRUNNER_URL and the API
credentials, DATABASE_URL, DOWNSTREAM_URL, and `.venv` as in a checkout. The
docs' port 9090 becomes the test's port.

Not run, but checked:
- `make X`: `make -n X` (the target exists); `make test` is CI itself.
- Lines that change the host (sudo, systemctl, journalctl): the repository files
  they copy exist, and the jobrunner command they give parses.
- Commands that serve until stopped: `jobrunner run|serve|work` (this test runs
  the first itself) are checked to parse; `python examples/NAME.py` is run by
  tests/test_examples.py.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import free_port, wait_until

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HOST_ONLY = re.compile(r"^\s*(sudo|systemctl|journalctl)\b")
MAKE = re.compile(r"^\s*make (\w+)")
EXAMPLE = re.compile(r"python3? (examples/\w+\.py)")
SERVICE = re.compile(r"bin/jobrunner((?: --config \S+)?) (run|serve|work)\b")


def sh_blocks(path: Path) -> list[str]:
    blocks, current = [], None
    for line in path.read_text().splitlines():
        if current is None and line.strip() == "```sh":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [command for command in block.replace("\\\n", " ").splitlines() if command.strip() and not command.strip().startswith("#")]


def kind(block: str) -> str:
    lines = commands(block)
    if any(MAKE.match(line) for line in lines):
        return "make"
    if any(HOST_ONLY.match(line) for line in lines):
        return "host"
    if any(EXAMPLE.search(line) for line in lines):
        return "example"
    if any(SERVICE.search(line) for line in lines):
        return "host"  # serves until stopped: checked like a host's command
    return "run"


@pytest.fixture(scope="module")
def service():
    """`jobrunner run` in development mode in a scratch checkout-like directory; the environment the docs assume."""
    workdir = Path(tempfile.mkdtemp(prefix="jobrunner-docs-"))
    os.chmod(workdir, 0o755)  # the private cluster runs as postgres when we are root
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DATABASE_URL", "DOWNSTREAM", "PORT"))}
    env.update(PORT=str(port), JOBRUNNER_HOST="127.0.0.1", JOBRUNNER_WORKERS="1")
    process = subprocess.Popen(
        [str(ROOT / ".venv/bin/jobrunner"), "run"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(process.stdout), daemon=True)
    reader.start()
    try:
        printed = lambda pattern: next((m.group(1) for line in said if (m := re.search(pattern, line))), None)  # noqa: E731
        wait_until(lambda: printed(r"example downstream on (\S+)") or process.poll() is not None, "the service to start", timeout=60)
        assert process.poll() is None, "".join(said)
        password = (workdir / ".jobrunner" / "api-password").read_text().strip()
        env.update(
            PATH=f"{workdir / '.venv' / 'bin'}:{os.environ['PATH']}",
            JOBRUNNER_URL=f"http://127.0.0.1:{port}",
            JOBRUNNER_API_USER="admin",
            JOBRUNNER_API_PASSWORD=password,
            JOBRUNNER_USERS=f"admin:{password}",
            DATABASE_URL=printed(r"database (\S+)"),
            DOWNSTREAM_URL=printed(r"example downstream on (\S+)"),
        )
        healthy = ["curl", "-fsS", f"http://127.0.0.1:{port}/healthz"]
        wait_until(lambda: subprocess.run(healthy, capture_output=True).returncode == 0, "/healthz", timeout=30)
        # the job type the docs' examples name, as on a database Rickover used
        create = ["jobrunner", "types", "create", "invoice-email", "--attempts", "3", "--concurrency", "5"]
        subprocess.run(create, env=env, cwd=workdir, check=True, capture_output=True)
        yield workdir, port, env
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        reader.join(timeout=10)
        process.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_the_commands_of_each_doc_work(doc, service):
    workdir, port, env = service
    blocks = sh_blocks(doc)
    for block in blocks:
        check = {"make": check_make, "host": check_host, "example": check_example, "run": run_block}[kind(block)]
        check(block, workdir, port, env)


def run_block(block: str, workdir: Path, port: int, env: dict) -> None:
    script = block.replace("9090", str(port))
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{block}\n--- exit {result.returncode}:\n{result.stdout}\n{result.stderr}"


def check_make(block: str, *_) -> None:
    for line in commands(block):
        target = MAKE.match(line).group(1)
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"make {target}: {result.stderr}"


def check_host(block: str, *_) -> None:
    for line in commands(block):
        for path in re.findall(r"(?<![/\w])(systemd/[\w.-]+)", line):
            assert (ROOT / path).exists(), f"{line}: {path} is not in the repository"
        found = re.search(r"bin/jobrunner((?: --config \S+)?) ([\w-]+)", line)
        if found:
            result = subprocess.run([str(ROOT / ".venv/bin/jobrunner"), found.group(2), "--help"], capture_output=True, text=True)
            assert result.returncode == 0, f"{line}: jobrunner has no command {found.group(2)!r}"


def check_example(block: str, *_) -> None:
    runner = (ROOT / "tests" / "test_examples.py").read_text()
    for line in commands(block):
        for example in EXAMPLE.findall(line):
            assert (ROOT / example).exists(), f"{line}: {example} does not exist"
            assert Path(example).name in runner, f"{example} is not run by tests/test_examples.py"


def test_the_walkthroughs_are_run_not_only_checked():
    """The README's and the operations guide's commands run for real: a misclassification would only check them."""
    running = {doc.name for doc in DOCS if any(kind(block) == "run" for block in sh_blocks(doc))}
    assert {"README.md", "operations.md", "scaling.md", "migrating-from-rickover.md"} <= running
