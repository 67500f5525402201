"""What the microVM pass adds to the representative subset (conftest's MICROVM_SUBSET): the
`isolation` field (a Cordon extension) tells what the sandbox really has; a capture of a
running sandbox yields a snapshot a new sandbox boots from, except on a microVM, whose
guest-written disk is never mounted on the host: there the capture fails with that reason and
the sandbox goes on working.

These tests also run in the ordinary (namespace) pass, where `isolation` must say `namespace`.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from langsmith.sandbox import ResourceCreationError

from conftest import default_runtime, unique_name


def sandbox_object(cordon, name: str) -> dict:
    """The raw sandbox object: the official client drops fields it does not know (`isolation`)."""
    request = urllib.request.Request(
        f"{cordon.endpoint}/v2/sandboxes/boxes/{name}", headers={"X-Api-Key": cordon.api_key}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def test_isolation_says_what_the_sandbox_has(cordon, shared_sandbox):
    sandbox = sandbox_object(cordon, shared_sandbox.name)
    if default_runtime() == "microvm":
        assert sandbox["runtime"] == "microvm", sandbox
        # This box has no working KVM (nested KVM is broken here), so TCG; a KVM host says kvm.
        assert sandbox["isolation"] in ("microvm-tcg", "microvm-kvm"), sandbox
        # The guest's own kernel, not the host's: a microVM boots Debian's cloud kernel.
        assert "cloud" in shared_sandbox.run("uname -r").stdout
    else:
        assert (sandbox["runtime"], sandbox["isolation"]) == ("namespace", "namespace"), sandbox


def test_capture_of_a_running_sandbox_boots_again(client, shared_sandbox, make_sandbox):
    path = f"/home/user/{unique_name('captured')}.txt"
    shared_sandbox.write(path, b"kept by the capture\n")
    name = unique_name("snap-vm")
    if default_runtime() == "microvm":
        with pytest.raises(ResourceCreationError) as refused:
            client.capture_snapshot(shared_sandbox.name, name, timeout=120)
        assert "never mounted on the host" in str(refused.value), str(refused.value)
        assert shared_sandbox.run("echo still-here").stdout == "still-here\n"
        assert shared_sandbox.read(path) == b"kept by the capture\n"
        return
    snapshot = client.capture_snapshot(shared_sandbox.name, name, timeout=120)
    try:
        assert snapshot.status == "ready"
        # The captured sandbox goes on working.
        assert shared_sandbox.run("echo still-here").stdout == "still-here\n"
        second = make_sandbox(snapshot=name)
        assert second.read(path) == b"kept by the capture\n"
        assert second.run(f"cat {path}").stdout == "kept by the capture\n"
    finally:
        for sb in client.list_sandboxes():
            if sb.snapshot_id == snapshot.id:
                client.delete_sandbox(sb.name)
        client.delete_snapshot(snapshot.id)
