"""Command execution through the official client (WebSocket `/execute/ws`, spec §3.3)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import run_client_script, unique_name
from langsmith.sandbox import (
    CommandHandle,
    CommandTimeoutError,
    OutputChunk,
    SandboxConnectionError,
    SandboxOperationError,
)


def test_echo(shared_sandbox):
    result = shared_sandbox.run("echo hi")
    assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "", 0)
    assert result.success


def test_stdout_and_stderr_are_separate(shared_sandbox):
    result = shared_sandbox.run("echo out; echo err >&2; echo out2; echo err2 >&2")
    assert result.stdout == "out\nout2\n"
    assert result.stderr == "err\nerr2\n"
    assert result.exit_code == 0


@pytest.mark.parametrize("command, code", [("exit 3", 3), ("false", 1), ("exit 255", 255), ("nosuchcommand-xyz", 127)])
def test_non_zero_exit(shared_sandbox, command, code):
    result = shared_sandbox.run(command)
    assert result.exit_code == code
    assert not result.success


def test_command_not_found_message(shared_sandbox):
    result = shared_sandbox.run("nosuchcommand-xyz")
    assert "nosuchcommand-xyz" in result.stderr and "not found" in result.stderr


def test_killed_by_signal_is_non_zero(shared_sandbox):
    result = shared_sandbox.run("echo before; kill -9 $$")
    assert result.stdout == "before\n"
    assert result.exit_code != 0


def test_default_shell_is_bash_and_sh_works(shared_sandbox):
    assert shared_sandbox.run("echo ${BASH_VERSION:-nobash}").stdout not in ("", "nobash\n")
    r = shared_sandbox.run("echo ${BASH_VERSION:-nobash}", shell="/bin/sh")
    assert (r.stdout, r.exit_code) == ("nobash\n", 0)


def test_default_run_config(shared_sandbox):
    """The default snapshot runs commands as `user` in /home/user (§9.5)."""
    result = shared_sandbox.run("whoami; pwd")
    assert result.stdout == "user\n/home/user\n"
    assert shared_sandbox.run("echo $HOME").stdout == "/home/user\n", "HOME should be the run user's home"


def test_env_cwd_and_run_config(shared_sandbox):
    assert shared_sandbox.run('echo "$FOO-$BAR"', env={"FOO": "a b", "BAR": "c"}).stdout == "a b-c\n"
    assert shared_sandbox.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    r = shared_sandbox.run('pwd; echo "$X"', run_config={"work_dir": "/usr", "env_vars": {"X": "y"}})
    assert r.stdout == "/usr\ny\n"
    # PATH from the snapshot still applies when env_vars merge in another variable.
    assert shared_sandbox.run("command -v python3", run_config={"env_vars": {"Z": "1"}}).stdout.strip().endswith(
        "/python3"
    )


def test_root_can_add_users_and_groups(make_sandbox):
    """Debian packages' install scripts run groupadd/useradd, which open an audit socket first:
    the sandbox must answer it the way a kernel without audit does, not with EPERM."""
    sb = make_sandbox()
    root = {"user": "root"}
    result = sb.run("groupadd -r cordontest && useradd -r -g cordontest -M cordontest && id cordontest", run_config=root)
    assert result.exit_code == 0, result.stderr
    assert "cordontest" in result.stdout


def test_utf8_output_across_chunks(shared_sandbox):
    """Chunks split on UTF-8 boundaries and offsets count raw bytes (§3.3.5)."""
    text = "héllo wörld ✓ 日本語 🎉"
    assert shared_sandbox.run(f"printf '%s\\n' '{text}'").stdout == text + "\n"
    n = 300_000
    handle = shared_sandbox.run(f"python3 -c \"import sys; sys.stdout.write('é✓🎉' * {n})\"", wait=False)
    expected_offset = 0
    parts = []
    for chunk in handle:
        assert chunk.stream == "stdout"
        assert chunk.offset == expected_offset, "offset must be the byte offset of the chunk's first byte"
        expected_offset += len(chunk.data.encode("utf-8"))
        parts.append(chunk.data)
    assert "".join(parts) == "é✓🎉" * n
    assert handle.result.exit_code == 0
    assert handle.last_stdout_offset == len(("é✓🎉" * n).encode("utf-8"))


# ---------------------------------------------------------------------------- timeouts


def test_timeout_raises_command_timeout_error(shared_sandbox):
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as e:
        shared_sandbox.run("echo started; sleep 30", timeout=2)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 15, elapsed
    assert isinstance(e.value, SandboxOperationError)
    assert e.value.error_type == "CommandTimeout"


def test_timeout_kills_the_process_group(shared_sandbox):
    marker = f"/tmp/timeout-{unique_name()}"
    with pytest.raises(CommandTimeoutError):
        shared_sandbox.run(f"sleep 300 & echo $! > {marker}.pid; wait; touch {marker}.done", timeout=2)
    time.sleep(0.5)
    r = shared_sandbox.run(f"kill -0 $(cat {marker}.pid) 2>/dev/null && echo alive || echo gone; ls {marker}.done 2>&1")
    assert r.stdout.startswith("gone\n"), r.stdout
    assert "No such file" in r.stdout


def test_zero_timeout_means_no_limit(shared_sandbox):
    assert shared_sandbox.run("sleep 1; echo slept", timeout=0).stdout == "slept\n"


# ---------------------------------------------------------------------------- streaming


def test_wait_false_handle_iteration(shared_sandbox):
    handle = shared_sandbox.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 7", wait=False
    )
    assert isinstance(handle, CommandHandle)
    assert isinstance(handle.command_id, str) and handle.command_id
    assert isinstance(handle.pid, int) and handle.pid > 0
    chunks = list(handle)
    assert all(isinstance(c, OutputChunk) for c in chunks)
    assert {c.stream for c in chunks} == {"stdout", "stderr"}
    for stream in ("stdout", "stderr"):
        offset = 0
        for c in (c for c in chunks if c.stream == stream):
            assert c.offset == offset, (stream, c)
            offset += len(c.data.encode())
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "out1\nout2\nout3\n"
    assert "".join(c.data for c in chunks if c.stream == "stderr") == "err1\nerr2\nerr3\n"
    result = handle.result
    assert (result.stdout, result.stderr, result.exit_code) == ("out1\nout2\nout3\n", "err1\nerr2\nerr3\n", 7)
    assert handle.last_stdout_offset == 15 and handle.last_stderr_offset == 15


def test_output_is_streamed_while_running(shared_sandbox):
    handle = shared_sandbox.run("echo first; sleep 3; echo second", wait=False)
    started = time.monotonic()
    first = next(iter(handle))
    assert first.data.startswith("first")
    assert time.monotonic() - started < 2.5, "the first line must arrive before the command ends"
    assert handle.result.stdout == "first\nsecond\n"


def test_callbacks(shared_sandbox):
    out, err = [], []
    result = shared_sandbox.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; done", on_stdout=out.append, on_stderr=err.append
    )
    assert "".join(out) == result.stdout == "o1\no2\no3\n"
    assert "".join(err) == result.stderr == "e1\ne2\ne3\n"
    assert result.exit_code == 0


# ---------------------------------------------------------------------------- stdin and PTY


def test_stdin_closed_by_default(shared_sandbox):
    """Non-PTY commands get `close_stdin: true`, so `cat` sees EOF at once (§3.3.3)."""
    started = time.monotonic()
    result = shared_sandbox.run("cat; echo eof", timeout=20)
    assert result.stdout == "eof\n"
    assert time.monotonic() - started < 10


def test_send_input_and_close_input(shared_sandbox):
    handle = shared_sandbox.run("cat; echo done", wait=False, close_input=False, timeout=30)
    handle.send_input("hello\n")
    handle.send_input("wörld\n")
    handle.close_input()
    result = handle.result
    assert result.stdout == "hello\nwörld\ndone\n"
    assert result.exit_code == 0


def test_interactive_stdin(shared_sandbox):
    handle = shared_sandbox.run(
        'read a; echo "got:$a"; read b; echo "got:$b"', wait=False, close_input=False, timeout=30
    )
    it = iter(handle)
    handle.send_input("one\n")
    assert next(it).data == "got:one\n"
    handle.send_input("two\n")
    assert next(it).data == "got:two\n"
    assert handle.result.exit_code == 0


def test_pty(shared_sandbox):
    result = shared_sandbox.run("tty; test -t 0 && test -t 1 && echo is-a-tty; echo to-stderr >&2", pty=True)
    lines = result.stdout.replace("\r\n", "\n").splitlines()
    assert lines[0].startswith("/dev/pts/"), result.stdout
    assert "is-a-tty" in lines
    assert "to-stderr" in lines, "under a PTY stderr is merged into stdout"
    assert result.stderr == ""
    assert result.exit_code == 0


def test_pty_input(shared_sandbox):
    handle = shared_sandbox.run('read -r line; echo "got:$line"', pty=True, wait=False, timeout=30)
    handle.send_input("typed\n")
    out = handle.result.stdout.replace("\r\n", "\n")
    assert "got:typed" in out
    assert handle.result.exit_code == 0


# ---------------------------------------------------------------------------- kill


def test_kill(shared_sandbox):
    marker = f"/tmp/kill-{unique_name()}"
    handle = shared_sandbox.run(f"sleep 300 & echo $! > {marker}; echo ready; wait", wait=False, timeout=600)
    command_id = handle.command_id
    it = iter(handle)
    assert next(it).data == "ready\n"
    handle.kill()
    # Python closes the socket right after sending kill, and a killed handle does not reconnect:
    # the iteration ends with SandboxConnectionError, or with the exit if it was already read.
    try:
        for _ in it:
            pass
        assert handle.result.exit_code != 0
    except SandboxConnectionError:
        pass
    # The command really ended, with a non-zero exit, and its whole process group is gone.
    after = shared_sandbox.reconnect(command_id).result
    assert after.exit_code != 0
    assert after.stdout == "ready\n"
    r = shared_sandbox.run(f"kill -0 $(cat {marker}) 2>/dev/null && echo alive || echo gone")
    assert r.stdout == "gone\n"


DETACH_SCRIPT = r"""
import json, os, sys
from langsmith.sandbox import SandboxClient
name, command, kill_on_disconnect = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sb = SandboxClient().get_sandbox(name)
handle = sb.run(command, wait=False, kill_on_disconnect=kill_on_disconnect, timeout=600)
first = next(iter(handle))
print(json.dumps({"command_id": handle.command_id, "first": first.data}), flush=True)
os._exit(0)  # the process dies with its WebSocket open
"""


def test_kill_on_disconnect(shared_sandbox):
    marker = f"/tmp/kod-{unique_name()}"
    out = run_client_script(DETACH_SCRIPT, shared_sandbox.name, f"echo $$ > {marker}; echo ready; sleep 300", "1")
    assert out["first"] == "ready\n"
    deadline = time.monotonic() + 10
    while True:
        r = shared_sandbox.run(f"kill -0 $(cat {marker}) 2>/dev/null && echo alive || echo gone")
        if r.stdout == "gone\n":
            break
        assert time.monotonic() < deadline, "kill_on_disconnect did not kill the command"
        time.sleep(0.2)
    assert shared_sandbox.reconnect(out["command_id"]).result.exit_code != 0


def test_command_survives_client_disconnect(shared_sandbox):
    """Without kill_on_disconnect a command keeps running after its client goes away (§3.3.8)."""
    marker = f"/tmp/detached-{unique_name()}"
    out = run_client_script(
        DETACH_SCRIPT, shared_sandbox.name, f"echo started; sleep 1; echo finished > {marker}; echo end", "0"
    )
    assert out["first"] == "started\n"
    result = shared_sandbox.reconnect(out["command_id"]).result
    assert (result.stdout, result.exit_code) == ("started\nend\n", 0)
    assert shared_sandbox.read(marker) == b"finished\n"


# ---------------------------------------------------------------------------- reconnect

RECONNECT_SCRIPT = r"""
import json, sys
from langsmith.sandbox import SandboxClient
name, command_id, out_off, err_off = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with SandboxClient() as client:
    sb = client.get_sandbox(name)
    handle = sb.reconnect(command_id, stdout_offset=out_off, stderr_offset=err_off)
    chunks = [[c.stream, c.offset, c.data] for c in handle]
    r = handle.result
    print(json.dumps({"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code, "chunks": chunks}))
"""


def test_reconnect_from_second_process_with_offsets(shared_sandbox):
    handle = shared_sandbox.run(
        "for i in 1 2 3 4 5; do echo line$i; echo e$i >&2; sleep 0.3; done; exit 4", wait=False, timeout=60
    )
    command_id = handle.command_id
    time.sleep(0.5)  # line1/e1 (and maybe line2) are out
    # A second process attaches while this one is still attached, skipping "line1\n" and "e1\n".
    other = run_client_script(RECONNECT_SCRIPT, shared_sandbox.name, command_id, "6", "3")
    full = handle.result
    assert full.stdout == "line1\nline2\nline3\nline4\nline5\n"
    assert full.stderr == "e1\ne2\ne3\ne4\ne5\n"
    assert full.exit_code == 4
    assert other["stdout"] == full.stdout[6:]
    assert other["stderr"] == full.stderr[3:]
    assert other["exit_code"] == 4
    first_out = next(c for c in other["chunks"] if c[0] == "stdout")
    assert first_out[1] == 6, "resumed output starts at the requested offset"

    # A finished command is replayed from any offset within its TTL, from a fresh process too.
    replay = run_client_script(RECONNECT_SCRIPT, shared_sandbox.name, command_id, "0", "0")
    assert (replay["stdout"], replay["stderr"], replay["exit_code"]) == (full.stdout, full.stderr, 4)
    tail = run_client_script(RECONNECT_SCRIPT, shared_sandbox.name, command_id, str(len(full.stdout)), "12")
    assert (tail["stdout"], tail["stderr"], tail["exit_code"]) == ("", full.stderr[12:], 4)


def test_reconnect_handle_method(shared_sandbox):
    handle = shared_sandbox.run("echo a; sleep 0.5; echo b", wait=False)
    it = iter(handle)
    assert next(it).data == "a\n"
    assert handle.last_stdout_offset == 2
    again = handle.reconnect()
    assert again.result.stdout == "b\n"
    assert again.result.exit_code == 0


def test_reconnect_unknown_command(shared_sandbox):
    with pytest.raises(SandboxOperationError) as e:
        shared_sandbox.reconnect("0" * 32).result
    assert e.value.error_type == "CommandNotFound"


# ---------------------------------------------------------------------------- concurrency and volume


def test_concurrent_commands(shared_sandbox):
    n = 8
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = shared_sandbox.run(f"echo start{i}; sleep 2; echo end{i} >&2; exit {i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    assert not errors, errors
    for i in range(n):
        r = results[i]
        assert (r.stdout, r.stderr, r.exit_code) == (f"start{i}\n", f"end{i}\n", i)
    assert elapsed < n * 2 * 0.75, f"{n} two-second commands took {elapsed:.1f}s: not run concurrently"


def test_concurrent_commands_several_sandboxes(client, make_sandbox):
    boxes = [make_sandbox() for _ in range(3)]
    results = {}

    def work(sb, i):
        results[(sb.name, i)] = sb.run(f"echo {sb.name}-{i}")

    threads = [threading.Thread(target=work, args=(sb, i)) for sb in boxes for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12
    for (name, i), r in results.items():
        assert r.stdout == f"{name}-{i}\n" and r.exit_code == 0


def test_large_stdout(shared_sandbox):
    size = 4 * 1024 * 1024
    result = shared_sandbox.run(f"head -c {size} /dev/zero | tr '\\0' 'a'", timeout=120)
    assert len(result.stdout) == size
    assert result.stdout == "a" * size
    assert result.exit_code == 0


def test_large_line_output_and_stderr(shared_sandbox):
    n = 300_000
    result = shared_sandbox.run(f"seq 1 {n}; seq 1 {n} >&2", timeout=120)
    expected = "".join(f"{i}\n" for i in range(1, n + 1))
    assert len(result.stdout) == len(expected) and result.stdout == expected
    assert result.stderr == expected


def test_large_command_text(shared_sandbox):
    """deepagents sends commands of 70 KB+ (§3.3.2): the server must accept big client messages."""
    payload = "x" * 100_000  # one argv string: must stay under Linux's 128 KiB MAX_ARG_STRLEN
    result = shared_sandbox.run(f"echo -n '{payload}' | wc -c")
    assert result.stdout.strip() == "100000"


def test_many_sequential_runs(shared_sandbox):
    for i in range(30):
        assert shared_sandbox.run(f"echo {i}").stdout == f"{i}\n"


def test_same_command_id_is_idempotent_over_the_wire(shared_sandbox, cordon):
    """get-or-create on command_id (§3.3.3): re-sending `execute` with the same id attaches to
    the existing command instead of starting a second one. Uses the client's own WS stream
    function, the path run() takes when it re-issues after an early close."""
    from langsmith.sandbox._ws_execute import run_ws_stream

    marker = f"/tmp/idem-{unique_name()}"
    command_id = "c0ffee" + "0" * 26
    cmd = f"echo run >> {marker}; sleep 1; cat {marker}"
    s1, _ = run_ws_stream(shared_sandbox.dataplane_url, cordon.api_key, cmd, command_id=command_id)
    first = next(s1)
    assert first == {"type": "started", "command_id": command_id, "pid": first["pid"]}
    s2, _ = run_ws_stream(shared_sandbox.dataplane_url, cordon.api_key, cmd, command_id=command_id)
    second = next(s2)
    assert second["type"] == "started" and second["command_id"] == command_id
    assert second["pid"] == first["pid"]
    out1 = "".join(m.get("data", "") for m in s1 if m["type"] == "stdout")
    out2 = "".join(m.get("data", "") for m in s2 if m["type"] == "stdout")
    assert out1 == out2 == "run\n"


def test_invalid_utf8_output(shared_sandbox):
    """Invalid bytes arrive as U+FFFD and never break the stream (§3.3.5 rec.)."""
    result = shared_sandbox.run("printf 'a\\377\\376b\\n'; head -c 3000 /dev/urandom >/dev/null; echo end")
    assert result.stdout.startswith("a") and result.stdout.endswith("b\nend\n")
    assert "\ufffd" in result.stdout
    binary = shared_sandbox.run("head -c 200000 /dev/urandom; echo; echo tail-marker")
    assert binary.exit_code == 0 and binary.stdout.endswith("tail-marker\n")


def test_resource_settings_are_echoed_and_memory_is_limited(make_sandbox):
    sb = make_sandbox(vcpus=1, mem_bytes=256 * 1024 * 1024)
    assert (sb.vcpus, sb.mem_bytes) == (1, 256 * 1024 * 1024)
    ok = sb.run("python3 -c \"b = bytearray(64 * 1024 * 1024); print(len(b))\"")
    assert (ok.stdout, ok.exit_code) == ("67108864\n", 0)
    over = sb.run("python3 -c \"b = bytearray(1024 * 1024 * 1024); print('allocated')\"", timeout=60)
    assert over.exit_code != 0 and "allocated" not in over.stdout
