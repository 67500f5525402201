"""TCP tunnels through the official client's `sb.tunnel()` (spec §4): a real Redis server inside a
sandbox, used through the tunnel by a real Redis client on the host (`redis-cli`, Debian's
redis-tools).

The sandbox (default snapshot, no network) gets Redis from Debian packages downloaded on the host
(`apt-get download`, cached under .cache/clients/debs/redis), uploaded with the client and
installed with `dpkg -i` as root; once per session.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, free_port, unique_name

DEBS_DIR = REPO / ".cache/clients/debs/redis"
# redis-server and what the default snapshot lacks of its dependencies (bookworm).
PACKAGES = ["redis-server", "redis-tools", "lsb-base", "libatomic1", "libjemalloc2", "liblzf1"]
REDIS_PORT = 6379
# Cordon's reserved in-sandbox port (cordon_api::tunnel::EGRESS_RELAY_PORT). The agent's egress
# relay listens there, so "not allowed" cannot be mistaken for "nothing listening".
RESERVED_PORT = 15001
CLOSED_PORT = 6390


def redis_debs() -> list[Path]:
    """The .deb files, downloaded once into the cache."""
    DEBS_DIR.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in DEBS_DIR.glob("*.deb")}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        proc = subprocess.run(["apt-get", "download", *missing], cwd=DEBS_DIR, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"apt-get download {' '.join(missing)} failed:\n{proc.stderr}")
    return sorted(DEBS_DIR.glob("*.deb"))


def redis_cli(port: int, *args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        input=stdin, capture_output=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


@pytest.fixture(scope="module")
def redis_sandbox(client):
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is missing on the host: apt-get install redis-tools")
    sb = client.create_sandbox(name=unique_name("tunnel-redis"), timeout=120)
    try:
        staging = "/tmp/redis-debs"
        for deb in redis_debs():
            sb.write(f"{staging}/{deb.name}", deb.read_bytes(), timeout=120)
        root = {"user": "root"}
        # policy-rc.d 101: the maintainer scripts must not start the service themselves. The
        # redis account is made by hand: groupadd aborts in the sandbox ("Cannot open audit
        # interface"), and adduser accepts an existing system account.
        install = sb.run(
            "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d"
            " && echo 'redis:x:999:' >> /etc/group"
            " && echo 'redis:x:999:999::/var/lib/redis:/usr/sbin/nologin' >> /etc/passwd"
            f" && dpkg -i {staging}/*.deb",
            run_config=root, timeout=300,
        )
        assert install.exit_code == 0, (install.stdout + install.stderr)[-3000:]
        for port in (REDIS_PORT,):
            started = sb.run(
                f"redis-server --bind 127.0.0.1 --port {port} --daemonize yes --save '' "
                f"--appendonly no --dir /tmp --logfile /tmp/redis-{port}.log >/dev/null 2>&1",
                timeout=60,
            )
            assert started.exit_code == 0, started.stderr
        ready = sb.run(
            f"for i in $(seq 100); do redis-cli -p {REDIS_PORT} ping"
            " && exit 0; sleep 0.1; done; exit 1",
            timeout=60,
        )
        assert ready.exit_code == 0, ready.stdout + ready.stderr
        yield sb
    finally:
        try:
            client.delete_sandbox(sb.name)
        except Exception:  # noqa: BLE001 - leftovers are swept at session end
            pass


def test_redis_through_a_tunnel(redis_sandbox):
    with redis_sandbox.tunnel(REDIS_PORT, local_port=free_port()) as t:
        assert redis_cli(t.local_port, "PING") == "PONG"
        assert redis_cli(t.local_port, "SET", "greeting", "hello from the host") == "OK"
        assert redis_cli(t.local_port, "GET", "greeting") == "hello from the host"
        # Larger than a yamux window each way: flow control in both directions.
        big = "".join(chr(97 + (i * 7) % 26) for i in range(3 << 20))
        assert redis_cli(t.local_port, "-x", "SET", "big", stdin=big.encode()) == "OK"
        assert redis_cli(t.local_port, "STRLEN", "big") == str(len(big))
        assert redis_cli(t.local_port, "GET", "big") == big
    # And the value really is inside the sandbox's Redis.
    inside = redis_sandbox.run(f"redis-cli -p {REDIS_PORT} GET greeting")
    assert inside.stdout.strip() == "hello from the host"


def test_several_tunnels_and_concurrent_connections(redis_sandbox):
    with redis_sandbox.tunnel(REDIS_PORT, local_port=free_port()) as a, \
            redis_sandbox.tunnel(REDIS_PORT, local_port=free_port()) as b:

        def round_trip(n: int) -> str:
            port = (a, b)[n % 2].local_port
            key = f"k{n}"
            assert redis_cli(port, "SET", key, f"value {n}") == "OK"
            other = (a, b)[(n + 1) % 2].local_port
            return redis_cli(other, "GET", key)

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(round_trip, range(48)))
        assert answers == [f"value {n}" for n in range(48)]

        # Long-lived connections open side by side on one tunnel.
        conns = [socket.create_connection(("127.0.0.1", a.local_port), timeout=20) for _ in range(10)]
        try:
            for i, c in enumerate(conns):
                c.sendall(f"SET held{i} {i}\r\n".encode())
            for c in conns:
                assert recv_line(c) == b"+OK"
            for i, c in enumerate(conns):
                c.sendall(f"GET held{i}\r\n".encode())
            for i, c in enumerate(conns):
                assert recv_line(c) == f"${len(str(i))}".encode()
                assert recv_line(c) == str(i).encode()
        finally:
            for c in conns:
                c.close()


@pytest.mark.parametrize(
    "port, expected_log",
    [(RESERVED_PORT, "not allowed"), (CLOSED_PORT, "nothing listening")],
    ids=["reserved-port-not-allowed", "closed-port-dial-failed"],
)
def test_refused_ports_close_the_local_connection(redis_sandbox, caplog, port, expected_log):
    caplog.set_level(logging.WARNING, logger="langsmith.sandbox._tunnel")
    with redis_sandbox.tunnel(port, local_port=free_port()) as t:
        with socket.create_connection(("127.0.0.1", t.local_port), timeout=20) as c:
            c.sendall(b"PING\r\n")
            assert read_until_closed(c) == b""
        wait_for(lambda: any(expected_log in r.getMessage() for r in caplog.records), what=expected_log)
        # The tunnel itself stays usable for the next connection.
        with socket.create_connection(("127.0.0.1", t.local_port), timeout=20) as c:
            assert read_until_closed(c) == b""


def test_the_reserved_port_answers_inside(redis_sandbox):
    """Positive control for the refusal above: inside, the egress relay answers on the reserved
    port (its proxy refuses a private address with 403)."""
    inside = redis_sandbox.run(
        f"curl -s -o /dev/null -w '%{{http_code}}' -x http://127.0.0.1:{RESERVED_PORT} http://10.0.0.1/",
        timeout=60,
    )
    assert inside.stdout.strip() == "403", inside.stdout + inside.stderr


def recv_line(c: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = c.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data[:-2]


def read_until_closed(c: socket.socket) -> bytes:
    """Everything the connection yields until the far side closes it (a reset counts as closed)."""
    data = b""
    try:
        while True:
            chunk = c.recv(4096)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
