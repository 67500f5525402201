"""Fixtures for the official-client compatibility suite.

One `cordon serve` per test session: a free loopback port, a temporary data dir, two random API
keys (two workspaces: `--api-key` is repeatable). The official `langsmith` client finds it the way
a user's would, through `LANGSMITH_ENDPOINT=http://127.0.0.1:PORT/api` and `LANGSMITH_API_KEY`.

When a collected test uses the `registries` fixture, two real OCI registries are started first
(`cordon-testkit`'s `test-registries` example: Debian's docker-registry on loopback, one open over
plain HTTP, one behind TLS from a test CA with htpasswd auth, test images pushed to both) and the
server gets `--insecure-registry <open>` and `--registry-ca <ca.pem>`.

Environment:
  CORDON_BIN            the binary (default: target/debug/cordon, then target/release/cordon)
  CORDON_START_TIMEOUT  seconds to wait for GET /healthz (default 180)
  CORDON_KEEP_DATA=1    keep the data dir (its path is printed) instead of removing it
  CORDON_TEST_REGISTRIES_BIN  the registry helper (default: target/debug/examples/test-registries,
                        built with cargo when missing)
  CORDON_REGISTRIES_TIMEOUT   seconds to wait for the helper's JSON line (default 180)
  CORDON_DEFAULT_RUNTIME  `namespace` or `microvm`: every server of the session gets
                        `--default-runtime` with it, so the official client's sandboxes are microVMs
                        (the guest kernel must be prepared: `cordon prepare`). run.sh's microVM pass
                        sets it and selects the `microvm` marker (MICROVM_SUBSET below).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[3]
LOG_TAIL_LINES = 200
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Nothing in this suite may talk to LangSmith's hosted service or be sent through a proxy.
for _var in list(os.environ):
    if _var.startswith(("LANGSMITH_", "LANGCHAIN_")):
        del os.environ[_var]
os.environ["LANGSMITH_TRACING"] = "false"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def cordon_bin() -> Path:
    explicit = os.environ.get("CORDON_BIN")
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            path = REPO / path
        return path
    for candidate in (REPO / "target/debug/cordon", REPO / "target/release/cordon"):
        if candidate.exists():
            return candidate
    raise pytest.UsageError("no cordon binary: build it (cargo build -p cordon) or set CORDON_BIN")


def default_runtime() -> str:
    """The backend sandboxes of this session get (`CORDON_DEFAULT_RUNTIME`, default namespace)."""
    return os.environ.get("CORDON_DEFAULT_RUNTIME") or "namespace"


def default_runtime_args() -> list[str]:
    explicit = os.environ.get("CORDON_DEFAULT_RUNTIME")
    return ["--default-runtime", explicit] if explicit else []


# The representative subset that run.sh's microVM pass runs (`-m microvm`) against a server with
# `--default-runtime microvm`: every data-plane operation at least once -- exec over WebSocket and
# over HTTP (SSE), streamed output, stdin, upload/download, glob/grep, stop/start keeping files,
# capture -- plus test_microvm.py. Almost all of them share one sandbox (`shared_sandbox`): under
# TCG every further boot costs ~6 s.
MICROVM_SUBSET = {
    "test_exec.py": {
        "test_echo", "test_stdout_and_stderr_are_separate", "test_non_zero_exit",
        "test_wait_false_handle_iteration", "test_output_is_streamed_while_running",
        "test_send_input_and_close_input", "test_interactive_stdin", "test_pty", "test_kill",
        "test_large_stdout", "test_timeout_raises_command_timeout_error",
    },
    "test_sessions.py": {"test_sse_run", "test_sse_streaming_and_reconnect", "test_sse_stdin_is_closed"},
    "test_files.py": {
        "test_write_read_text", "test_write_read_binary", "test_large_file_round_trip",
        "test_read_missing_file", "test_stat", "test_read_range", "test_glob_recursive", "test_ls",
        "test_grep",
    },
    "test_control_plane.py": {"test_stop_start_keeps_files"},
    "test_microvm.py": None,  # all of it
}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "microvm: in the representative subset run again against microVM sandboxes (run.sh)"
    )


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        wanted = MICROVM_SUBSET.get(item.path.name, set())
        if wanted is None or getattr(item, "originalname", item.name) in wanted:
            item.add_marker(pytest.mark.microvm)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CordonServer:
    """A running `cordon serve` and what a test needs to reach it."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.binary = cordon_bin()
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.restarts = 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.endpoint = f"{self.url}/api"
        self.api_key = "ck-" + secrets.token_hex(16)
        self.other_api_key = "ck-" + secrets.token_hex(16)
        self.data_dir = Path(tempfile.mkdtemp(prefix="cordon-clients-"))
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.proc: Optional[subprocess.Popen] = None
        self.started_in: Optional[float] = None

    @property
    def argv(self) -> list[str]:
        return [
            str(self.binary), "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir),
            "--api-key", self.api_key,
            "--api-key", self.other_api_key,
            *default_runtime_args(),
            *self.extra_args,
        ]

    def start(self, timeout: float) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.setdefault("CORDON_LOG", "info")
        env["NO_COLOR"] = "1"
        began = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=REPO, start_new_session=True,
        )
        log.close()
        deadline = began + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"`cordon serve` exited with {self.proc.returncode} before /healthz answered\n"
                    f"argv: {self.argv}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        self.started_in = time.monotonic() - began
                        return
                    last_error = f"status {resp.status}"
            except (urllib.error.URLError, OSError) as e:
                last_error = str(e)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"`cordon serve` did not answer GET /healthz with 200 within {timeout:.0f}s "
            f"(last: {last_error})\n{self.log_tail()}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, since: int = 0, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = ANSI.sub("", f.read().decode("utf-8", "replace"))
        except OSError as e:
            return f"(no server log: {e})"
        tail = text.splitlines()[-lines:]
        return f"--- cordon serve log ({self.log_path}, last {len(tail)} lines) ---\n" + "\n".join(tail)

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 60) -> Optional[int]:
        """Stops the server with `sig` and starts it again on the same port, data dir and keys."""
        assert self.proc is not None
        if sig == signal.SIGTERM:
            code = self.stop()
        else:
            self.proc.send_signal(sig)
            code = self.proc.wait(timeout=15)
        with open(self.log_path, "ab") as log:
            log.write(f"=== test harness: server stopped ({code}), restarting ===\n".encode())
        self.restarts += 1
        self.start(timeout)
        return code

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after 15 s. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        return self.proc.returncode


def registries_helper_bin() -> Path:
    """The registry helper; built with cargo (as `make clients-test` builds cordon) when missing."""
    explicit = os.environ.get("CORDON_TEST_REGISTRIES_BIN")
    if explicit:
        path = Path(explicit)
        return path if path.is_absolute() else REPO / path
    for candidate in (REPO / "target/debug/examples/test-registries", REPO / "target/release/examples/test-registries"):
        if candidate.exists():
            return candidate
    build = subprocess.run(
        ["cargo", "build", "-q", "-p", "cordon-testkit", "--example", "test-registries"],
        cwd=REPO, capture_output=True, text=True,
    )
    built = REPO / "target/debug/examples/test-registries"
    if build.returncode != 0 or not built.exists():
        raise RuntimeError(f"could not build the test-registries example ({build.returncode}):\n{build.stderr[-4000:]}")
    return built


class Registries:
    """The running `test-registries` helper: two real registries on loopback with test images.

    It prints one JSON line (`open`, `auth` as HOST:PORT, `ca_pem`, `username`, `password`,
    `images`: key -> reference) and runs until its stdin reaches EOF, so it also stops when this
    process dies.
    """

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        fd, log = tempfile.mkstemp(prefix="cordon-test-registries-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self.info: dict[str, Any] = {}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                cwd=REPO, start_new_session=True,
            )
        lines: list[bytes] = []
        got_line = threading.Event()

        def read_stdout() -> None:
            # The first line is the JSON; anything after it goes to the log so the pipe never fills.
            assert self.proc is not None and self.proc.stdout is not None
            first = self.proc.stdout.readline()
            lines.append(first)
            got_line.set()
            with open(self.log_path, "ab") as log:
                for rest in self.proc.stdout:
                    log.write(rest)

        threading.Thread(target=read_stdout, name="test-registries-stdout", daemon=True).start()
        if not got_line.wait(timeout):
            self.stop()
            raise RuntimeError(f"test-registries printed nothing within {timeout:.0f}s\n{self.log_tail()}")
        try:
            info = json.loads(lines[0])
            missing = [k for k in ("open", "auth", "ca_pem", "username", "password", "images") if k not in info]
            if missing:
                raise ValueError(f"missing keys {missing}")
        except ValueError as e:
            self.stop()
            raise RuntimeError(
                f"test-registries did not print its JSON line ({e}): {lines[0][:2000]!r}\n{self.log_tail()}"
            ) from None
        self.info = info

    @property
    def open(self) -> str:
        """HOST:PORT of the plain-HTTP registry without auth (passed as --insecure-registry)."""
        return self.info["open"]

    @property
    def auth(self) -> str:
        """HOST:PORT of the TLS registry with htpasswd auth (its CA passed as --registry-ca)."""
        return self.info["auth"]

    @property
    def username(self) -> str:
        return self.info["username"]

    @property
    def password(self) -> str:
        return self.info["password"]

    def image(self, key: str) -> str:
        images = self.info["images"]
        if key not in images:
            pytest.fail(f"test-registries pushed no image {key!r} (it has {sorted(images)})")
        return images[key]

    def serve_args(self) -> list[str]:
        return [
            "--insecure-registry", self.open,
            "--internal-registry", self.auth,
            "--registry-ca", self.info["ca_pem"],
        ]

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no test-registries log: {e})"
        tail = text.splitlines()[-lines:]
        return f"--- test-registries log ({self.log_path}, last {len(tail)} lines) ---\n" + "\n".join(tail)

    def stop(self) -> Optional[int]:
        """Closes its stdin (its signal to stop), then SIGKILLs its process group after 30 s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        return self.proc.returncode


_server: Optional[CordonServer] = None
_teardown_notes: list[str] = []


def _cleanup_sandboxes(server: CordonServer) -> list[str]:
    """Deletes every sandbox left in both workspaces (the sandboxes outlive `cordon serve`)."""
    from langsmith.sandbox import SandboxClient

    notes = []
    for key in (server.api_key, server.other_api_key):
        try:
            with SandboxClient(api_endpoint=f"{server.url}/api/v2/sandboxes", api_key=key, max_retries=0) as c:
                for sb in c.list_sandboxes():
                    try:
                        c.delete_sandbox(sb.name)
                        notes.append(f"deleted leftover sandbox {sb.name!r}")
                    except Exception as e:  # noqa: BLE001 - best effort, reported
                        notes.append(f"could not delete leftover sandbox {sb.name!r}: {e!r}")
        except Exception as e:  # noqa: BLE001
            notes.append(f"could not list sandboxes for cleanup: {e!r}")
    return notes


@pytest.fixture(scope="session")
def _registries_or_error(request) -> Iterator[Optional[Registries | str]]:
    """The registry helper when some collected test needs it (else None); its start-up error as
    a string when it could not start, so only the tests that need it fail."""
    if not any("registries" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    try:
        registries = Registries(registries_helper_bin())
    except RuntimeError as e:
        yield str(e)
        return
    try:
        registries.start(float(os.environ.get("CORDON_REGISTRIES_TIMEOUT", "180")))
    except (RuntimeError, OSError) as e:
        registries.stop()
        yield f"could not start test-registries: {e}"
        return
    yield registries
    code = registries.stop()
    if code != 0:
        _teardown_notes.append(f"test-registries exited with {code}\n{registries.log_tail()}")
    if os.environ.get("CORDON_KEEP_DATA") == "1":
        _teardown_notes.append(f"kept test-registries log {registries.log_path}")
    else:
        registries.log_path.unlink(missing_ok=True)


def _registry_serve_args(registries: Optional[Registries | str]) -> list[str]:
    return registries.serve_args() if isinstance(registries, Registries) else []


@pytest.fixture(scope="session")
def registries(_registries_or_error) -> Registries:
    """The two test registries (started before the server, which trusts them)."""
    if not isinstance(_registries_or_error, Registries):
        pytest.fail(_registries_or_error or "test-registries was not started")
    return _registries_or_error


@pytest.fixture(scope="session")
def cordon(_registries_or_error) -> Iterator[CordonServer]:
    global _server
    server = CordonServer(_registry_serve_args(_registries_or_error))
    timeout = float(os.environ.get("CORDON_START_TIMEOUT", "180"))
    try:
        server.start(timeout)
    except RuntimeError as e:
        if os.environ.get("CORDON_KEEP_DATA") != "1":
            shutil.rmtree(server.data_dir, ignore_errors=True)
            server.log_path.unlink(missing_ok=True)
        pytest.exit(f"could not start cordon serve: {e}", returncode=3)
    _server = server
    os.environ["LANGSMITH_ENDPOINT"] = server.endpoint
    os.environ["LANGSMITH_API_KEY"] = server.api_key
    yield server
    if server.alive():
        _teardown_notes.extend(_cleanup_sandboxes(server))
    code = server.stop()
    if code not in (0, -signal.SIGTERM, None):
        _teardown_notes.append(f"cordon serve exited with {code} on SIGTERM")
    if os.environ.get("CORDON_KEEP_DATA") == "1":
        _teardown_notes.append(f"kept data dir {server.data_dir} and log {server.log_path}")
    else:
        shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _server_stays_up(request, cordon: CordonServer) -> Iterator[None]:
    """Every test needs the server; a test after which it is dead fails with its log."""
    import langsmith.utils

    # langsmith caches environment lookups; tests that change LANGSMITH_* must be seen.
    langsmith.utils.get_env_var.cache_clear()
    request.node._cordon_log_offset = cordon.log_size()
    yield
    langsmith.utils.get_env_var.cache_clear()
    if not cordon.alive():
        pytest.fail(f"cordon serve died (exit {cordon.proc.returncode})\n{cordon.log_tail()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item._cordon_failed = True
    if report.failed and _server is not None:
        since = getattr(item, "_cordon_log_offset", 0)
        report.sections.append(("cordon serve log during this test", _server.log_tail(since, 80)))
        own = getattr(item, "_cordon_own_server", None)
        if own is not None:
            report.sections.append(("the test's own cordon serve log", own.log_tail(0, 120)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _server is None:
        return
    tr = terminalreporter
    tr.section("cordon serve")
    tr.write_line(f"binary: {_server.binary}")
    if _server.started_in is not None:
        tr.write_line(f"ready (GET /healthz 200) after {_server.started_in:.2f}s")
    for note in _teardown_notes:
        tr.write_line(note)
    if exitstatus != 0 or os.environ.get("CORDON_SHOW_LOG") == "1":
        tr.write_line(_server.log_tail())
    elif os.environ.get("CORDON_KEEP_DATA") != "1":
        _server.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Clients and sandboxes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def own_server(request, cordon: CordonServer) -> Iterator[CordonServer]:
    """A second `cordon serve` of the test's own, for tests that stop or restart the server
    (with the same registry flags as the session's)."""
    server = CordonServer(cordon.extra_args)
    request.node._cordon_own_server = server
    try:
        server.start(float(os.environ.get("CORDON_START_TIMEOUT", "180")))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    if server.alive():
        _teardown_notes.extend(_cleanup_sandboxes(server))
    server.stop()
    if os.environ.get("CORDON_KEEP_DATA") != "1":
        shutil.rmtree(server.data_dir, ignore_errors=True)
        if not getattr(request.node, "_cordon_failed", False):
            server.log_path.unlink(missing_ok=True)


def unique_name(prefix: str = "compat") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def client(cordon: CordonServer):
    """The official client, configured only through the environment, as a user would."""
    from langsmith.sandbox import SandboxClient

    c = SandboxClient()
    yield c
    c.close()


@pytest.fixture(scope="session")
def other_client(cordon: CordonServer):
    """A client of the second workspace (the server's second --api-key)."""
    from langsmith.sandbox import SandboxClient

    c = SandboxClient(api_key=cordon.other_api_key)
    yield c
    c.close()


@pytest.fixture(scope="session")
def shared_sandbox(client):
    """One ready sandbox shared by the exec and file tests (each uses its own paths)."""
    sb = client.create_sandbox(name=unique_name("compat-shared"), timeout=120)
    yield sb
    try:
        client.delete_sandbox(sb.name)
    except Exception:  # noqa: BLE001 - already gone is fine; leftovers are swept at session end
        pass


@pytest.fixture
def make_sandbox(client) -> Iterator[Callable[..., object]]:
    """Creates sandboxes for one test and deletes whatever is left of them after it."""
    created = []

    def make(c=None, **kwargs):
        c = c or client
        kwargs.setdefault("name", unique_name())
        kwargs.setdefault("timeout", 120)
        sb = c.create_sandbox(**kwargs)
        created.append((c, sb))
        return sb

    yield make
    for c, sb in created:
        try:
            c.delete_sandbox(sb.name)
        except Exception:  # noqa: BLE001
            pass


def run_client_script(script: str, *args: str, timeout: float = 60) -> dict:
    """Runs `script` in a second Python process (same venv, same environment) and returns the
    JSON object it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )
    assert proc.returncode == 0, f"second client process failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
