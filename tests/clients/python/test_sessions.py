"""Command-session semantics beyond a single attachment (§3.3.3, §3.3.8), the SSE transport
(§3.4, Python opt-in), the async client, and `persistent` (§2.2.1)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from conftest import run_client_script, unique_name
from langsmith.sandbox import (
    AsyncSandboxClient,
    CommandTimeoutError,
    SandboxOperationError,
)

DETACH_SCRIPT = r"""
import json, os, sys
from langsmith.sandbox import SandboxClient
name, command, idle, ttl = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sb = SandboxClient().get_sandbox(name)
handle = sb.run(command, wait=False, idle_timeout=idle, ttl_seconds=ttl, timeout=600)
first = next(iter(handle))
print(json.dumps({"command_id": handle.command_id, "first": first.data}), flush=True)
os._exit(0)
"""


def wait_gone(sb, pidfile, timeout):
    deadline = time.monotonic() + timeout
    while True:
        r = sb.run(f"kill -0 $(cat {pidfile}) 2>/dev/null && echo alive || echo gone")
        if r.stdout == "gone\n":
            return time.monotonic()
        assert time.monotonic() < deadline, f"process in {pidfile} still alive after {timeout}s"
        time.sleep(0.25)


def test_idle_timeout_kills_unattached_command(shared_sandbox):
    pidfile = f"/tmp/idle-{unique_name()}"
    out = run_client_script(DETACH_SCRIPT, shared_sandbox.name, f"echo $$ > {pidfile}; echo up; sleep 300", "2", "600")
    assert out["first"] == "up\n"
    detached = time.monotonic()
    gone = wait_gone(shared_sandbox, pidfile, 20)
    assert gone - detached >= 1.0, "killed before idle_timeout_seconds elapsed"
    assert shared_sandbox.reconnect(out["command_id"]).result.exit_code != 0


def test_idle_timeout_paused_while_attached(shared_sandbox):
    # idle_timeout=1, but a client stays attached for 3 s: the command must finish normally.
    r = shared_sandbox.run("sleep 3; echo finished", idle_timeout=1)
    assert (r.stdout, r.exit_code) == ("finished\n", 0)


def test_idle_timeout_never(shared_sandbox):
    pidfile = f"/tmp/idle-never-{unique_name()}"
    out = run_client_script(DETACH_SCRIPT, shared_sandbox.name, f"echo $$ > {pidfile}; echo up; sleep 4; echo done", "-1", "600")
    time.sleep(1.5)
    alive = shared_sandbox.run(f"kill -0 $(cat {pidfile}) && echo alive").stdout
    assert alive == "alive\n"
    assert shared_sandbox.reconnect(out["command_id"]).result.stdout == "up\ndone\n"


def test_finished_session_expires_after_ttl(shared_sandbox):
    handle = shared_sandbox.run("echo short-lived", wait=False, ttl_seconds=1)
    assert handle.result.stdout == "short-lived\n"
    # Within the TTL a finished command can be replayed...
    assert shared_sandbox.reconnect(handle.command_id).result.stdout == "short-lived\n"
    time.sleep(3)
    # ...after it the session is gone (§3.3.4: SessionExpired, or CommandNotFound once forgotten).
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.reconnect(handle.command_id).result
    assert e.value.error_type in ("SessionExpired", "CommandNotFound")


def test_large_stdin(shared_sandbox):
    data = "".join(f"line {i} of the input\n" for i in range(60_000))  # ~1.3 MB
    handle = shared_sandbox.run("sha256sum; wc -c", wait=False, close_input=False, timeout=120)
    for i in range(0, len(data), 64 * 1024):
        handle.send_input(data[i : i + 64 * 1024])
    handle.close_input()
    # `sha256sum` consumes everything, so wc sees 0; the digest proves every byte arrived in order.
    out = handle.result.stdout.split()
    assert out[0] == hashlib.sha256(data.encode()).hexdigest()


def test_big_stream_to_slow_reader(shared_sandbox):
    """A producer much faster than the client loses nothing (bounded buffer + back-pressure)."""
    n = 1_500_000
    handle = shared_sandbox.run(f"seq 1 {n}", wait=False, timeout=300)
    received = []
    for i, chunk in enumerate(handle):
        received.append(chunk.data)
        if i < 20:
            time.sleep(0.05)  # let the command run far ahead of us for a while
    text = "".join(received)
    assert handle.result.exit_code == 0
    assert len(text) == sum(len(str(i)) + 1 for i in range(1, n + 1))
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(
        "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    ).hexdigest()


# ---------------------------------------------------------------------------- SSE transport (§3.4)


@pytest.fixture
def sse(monkeypatch):
    monkeypatch.setenv("LANGSMITH_EXPERIMENTAL_FEATURES", "sandbox_sse_exec")
    from langsmith.sandbox._sse_execute import sse_transport_selected

    assert sse_transport_selected()


def test_sse_run(shared_sandbox, sse):
    r = shared_sandbox.run("echo over-sse; echo err >&2; exit 5")
    assert (r.stdout, r.stderr, r.exit_code) == ("over-sse\n", "err\n", 5)


def test_sse_streaming_and_reconnect(shared_sandbox, sse):
    handle = shared_sandbox.run("for i in 1 2 3; do echo s$i; sleep 0.2; done", wait=False)
    assert handle.command_id
    chunks = list(handle)
    assert "".join(c.data for c in chunks) == "s1\ns2\ns3\n"
    assert handle.result.exit_code == 0
    again = shared_sandbox.reconnect(handle.command_id, stdout_offset=3)
    assert again.result.stdout == "s2\ns3\n"


def test_sse_timeout(shared_sandbox, sse):
    with pytest.raises(CommandTimeoutError):
        shared_sandbox.run("sleep 30", timeout=2)


def test_sse_stdin_is_closed(shared_sandbox, sse):
    assert shared_sandbox.run("cat; echo eof", timeout=20).stdout == "eof\n"


def test_sse_large_output(shared_sandbox, sse):
    size = 3 * 1024 * 1024
    r = shared_sandbox.run(f"head -c {size} /dev/zero | tr '\\0' 'z'", timeout=120)
    assert r.stdout == "z" * size


# ---------------------------------------------------------------------------- async client


def test_async_client(cordon):
    async def main():
        async with AsyncSandboxClient() as client:
            name = unique_name("async")
            sb = await client.create_sandbox(name=name, timeout=120)
            try:
                assert sb.status == "ready"
                r = await sb.run("echo async; echo e >&2; exit 2")
                assert (r.stdout, r.stderr, r.exit_code) == ("async\n", "e\n", 2)
                await sb.write("/tmp/async.txt", "via async")
                assert await sb.read("/tmp/async.txt") == b"via async"
                results = await asyncio.gather(*(sb.run(f"sleep 1; echo {i}") for i in range(5)))
                assert [x.stdout for x in results] == [f"{i}\n" for i in range(5)]
                handle = await sb.run("echo a; echo b", wait=False)
                chunks = [c.data async for c in handle]
                assert "".join(chunks) == "a\nb\n"
                names = {s.name for s in await client.list_sandboxes()}
                assert name in names
            finally:
                await client.delete_sandbox(name)

    asyncio.run(main())


# ---------------------------------------------------------------------------- persistent=false


def test_non_persistent_sandbox_discards_writes_on_stop(client, make_sandbox):
    sb = make_sandbox(persistent=False)
    sb.write("/home/user/ephemeral.txt", "gone after stop")
    assert sb.read("/home/user/ephemeral.txt") == b"gone after stop"
    client.stop_sandbox(sb.name)
    deadline = time.monotonic() + 60
    while client.get_sandbox_status(sb.name).status != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.start_sandbox(sb.name, timeout=120)
    r = sb.run("ls /home/user/ephemeral.txt 2>&1; true")
    assert "No such file" in r.stdout
