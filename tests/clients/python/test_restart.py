"""Nothing lost across a server restart (design brief, principle 3): after `cordon serve` is
stopped and started again on the same data dir, the official client finds its sandboxes, their
files, and the output of commands that ran through the restart. Each test runs its own server."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import unique_name
from langsmith.sandbox import SandboxClient


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_keeps_sandboxes_files_and_commands(own_server, sig):
    endpoint = own_server.url + "/api/v2/sandboxes"
    with SandboxClient(api_endpoint=endpoint, api_key=own_server.api_key) as client:
        sb = client.create_sandbox(name=unique_name("restart"), timeout=120)
        sb.write("/home/user/before-restart.txt", "kept")
        handle = sb.run("for i in 1 2 3 4 5 6; do echo tick$i; sleep 0.5; done; exit 3", wait=False, timeout=120)
        command_id = handle.command_id
        assert next(iter(handle)).data == "tick1\n"

    own_server.restart(sig)

    with SandboxClient(api_endpoint=endpoint, api_key=own_server.api_key) as client:
        again = client.get_sandbox(sb.name)
        assert (again.id, again.status, again.dataplane_url) == (sb.id, "ready", sb.dataplane_url)
        assert again.read("/home/user/before-restart.txt") == b"kept"
        result = again.reconnect(command_id).result
        assert result.stdout == "".join(f"tick{i}\n" for i in range(1, 7))
        assert result.exit_code == 3
        assert again.run("echo after").stdout == "after\n"
        # The other workspace's key still works and still sees nothing of this one.
        with SandboxClient(api_endpoint=endpoint, api_key=own_server.other_api_key) as other:
            assert sb.name not in {s.name for s in other.list_sandboxes()}
        client.delete_sandbox(sb.name)


def test_restart_keeps_stopped_sandbox(own_server):
    endpoint = own_server.url + "/api/v2/sandboxes"
    with SandboxClient(api_endpoint=endpoint, api_key=own_server.api_key) as client:
        sb = client.create_sandbox(name=unique_name("restart-stopped"), timeout=120)
        sb.write("/home/user/f.txt", "stopped then restarted")
        client.stop_sandbox(sb.name)
        deadline = time.monotonic() + 60
        while client.get_sandbox_status(sb.name).status != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.2)

    own_server.restart(signal.SIGTERM)

    with SandboxClient(api_endpoint=endpoint, api_key=own_server.api_key) as client:
        assert client.get_sandbox_status(sb.name).status == "stopped"
        started = client.start_sandbox(sb.name, timeout=120)
        assert started.read("/home/user/f.txt") == b"stopped then restarted"
        client.delete_sandbox(sb.name)
