"""Snapshots through the official client: build from real registries (spec §2.3.1, §2.6), sandboxes
from them (§2.2.1), capture (§2.2.11), names and tags (§2.3.2, §2.3.5), list paging (§2.3.3),
delete while in use (§2.3.4), failed builds (§2.5), the disk quota and stop/start (issue 4).

The images come from the `registries` fixture (conftest): Debian's docker-registry on loopback,
one open over plain HTTP (the server is started with `--insecure-registry` for it), one behind TLS
from a test CA (`--registry-ca`) with htpasswd auth. The busybox test image has
`Env GREETING=hello-from-image`, `WorkingDir /srv/app` (holding `hello.txt`, owned by 1000) and
`User 1000` (home `/home/user`, writable by it); see `cordon_testkit::registry`.
"""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pytest
from conftest import unique_name
from langsmith import Langsmith
from langsmith.sandbox import (
    ResourceCreationError,
    ResourceNotFoundError,
    SandboxClientError,
)

MIB = 1 << 20
# Small enough that writing past it is quick, large enough for the image and a few files.
CAPACITY = 64 * MIB
SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
APP_FILE, APP_FILE_CONTENT = "/srv/app/hello.txt", b"hello from /srv/app\n"


def assert_uuid(value):
    assert isinstance(value, str), value
    assert str(uuid.UUID(value)) == value.lower(), value


def image_tag(reference: str) -> str:
    """The tag of `host:port/repo:tag` (the port's colon is not a tag separator)."""
    last = reference.rsplit("/", 1)[-1].split("@", 1)[0]
    return last.split(":", 1)[1] if ":" in last else "latest"


def delete_quietly(client, ref: str) -> None:
    try:
        client.delete_snapshot(ref)
    except ResourceNotFoundError:
        pass


def delete_snapshots_named(client, name: str) -> None:
    """Deletes every snapshot called `name`, failed builds included (their ids never reached us)."""
    try:
        found = client.list_snapshots(name_contains=name, limit=500)
    except SandboxClientError:
        return
    for s in found:
        if s.name == name:
            delete_quietly(client, s.id)


@pytest.fixture
def snapshot_names(client) -> Iterator[Callable[[str], str]]:
    """Hands out unique snapshot names and deletes whatever was built under them after the test."""
    names: list[str] = []

    def new(prefix: str = "snap") -> str:
        names.append(unique_name(prefix))
        return names[-1]

    yield new
    for name in names:
        delete_snapshots_named(client, name)


@pytest.fixture(scope="module")
def busybox_snapshot(client, registries):
    """The busybox image from the open registry, adopting the image's USER/WORKDIR/ENV."""
    name = unique_name("snap-busybox")
    snap = client.create_snapshot(name, docker_image=registries.image("busybox"), fs_capacity_bytes=CAPACITY)
    yield snap
    delete_snapshots_named(client, name)


@pytest.fixture(scope="module")
def root_snapshot(client, registries):
    """The same image with `run_config={"user": "0"}`: the pre-run_config run-as-root behaviour."""
    name = unique_name("snap-root")
    snap = client.create_snapshot(
        name, docker_image=registries.image("busybox"), fs_capacity_bytes=CAPACITY, run_config={"user": "0"},
    )
    yield snap
    delete_snapshots_named(client, name)


def image_identity(sb) -> list[str]:
    """The image's env, work dir and uid as seen by a command in `sb`, and busybox's banner."""
    result = sb.run('printf "%s\\n" "$GREETING" "$(pwd)" "$(id -u)" && busybox | head -n 1')
    assert result.exit_code == 0, result.stderr
    return result.stdout.splitlines()


def wait_for_status(client, name: str, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = client.get_sandbox_status(name).status
        if last == want:
            return
        time.sleep(0.2)
    pytest.fail(f"sandbox {name} not {want} after {timeout}s (last {last})")


def as_root(sb, command: str):
    result = sb.run(command, run_config={"user": "0"})
    assert result.exit_code == 0, f"{command!r} failed ({result.exit_code}): {result.stderr}"
    return result


# ---------------------------------------------------------------------------- build from a registry


def test_build_from_open_registry_adopts_image_config(busybox_snapshot, registries, make_sandbox):
    snap = busybox_snapshot
    reference = registries.image("busybox")
    assert_uuid(snap.id)
    assert snap.status == "ready"
    assert snap.docker_image == reference
    assert snap.image_digest and SHA256_DIGEST.match(snap.image_digest), snap.image_digest
    assert snap.fs_capacity_bytes == CAPACITY
    # §2.3.1: without `tag`, the image's own tag.
    assert snap.tags == [image_tag(reference)]
    assert snap.run_config is not None, "the image's USER/WORKDIR/ENV become the snapshot's run_config"
    assert snap.run_config.user == "1000"
    assert snap.run_config.work_dir == "/srv/app"
    assert (snap.run_config.env_vars or {}).get("GREETING") == "hello-from-image"

    sb = make_sandbox(snapshot_id=snap.id)
    assert sb.snapshot_id == snap.id
    greeting, cwd, uid, banner = image_identity(sb)
    assert (greeting, cwd, uid) == ("hello-from-image", "/srv/app", "1000")
    assert banner.startswith("BusyBox"), banner
    assert sb.read(APP_FILE) == APP_FILE_CONTENT
    assert sb.run(f"stat -c %u:%g {APP_FILE}").stdout == "1000:1000\n", "the layer's owners are kept"
    # The sandbox's own run_config still layers over the image's (§2.1.2): env merges, user replaces.
    override = sb.run('echo "$GREETING $EXTRA $(id -u)"', run_config={"user": "0", "env_vars": {"EXTRA": "x"}})
    assert override.stdout == "hello-from-image x 0\n"


def test_build_from_private_registry_with_registries_api(client, cordon, registries, make_sandbox, snapshot_names):
    reference = registries.image("private_busybox")
    auth_failure = re.compile(r"401|unauthori[sz]ed|auth|credential", re.I)
    # Positive control first, while the workspace has no registry for that host (a workspace
    # registry serving the image's host is used even without `registry_id`): it demands credentials.
    with pytest.raises(ResourceCreationError) as e:
        client.create_snapshot(snapshot_names("snap-noauth"), docker_image=reference, fs_capacity_bytes=CAPACITY)
    assert auth_failure.search(str(e.value)), str(e.value)

    gen = Langsmith(api_key=cordon.api_key, base_url=cordon.url, max_retries=0)
    created: list[str] = []
    try:
        wrong_name = unique_name("reg-wrong")
        wrong = gen.sandboxes.registries.create(
            name=wrong_name, url=registries.auth, username=registries.username, password="not-the-password",
        )
        created.append(wrong_name)
        with pytest.raises(ResourceCreationError) as e:
            client.create_snapshot(
                snapshot_names("snap-badauth"), docker_image=reference, fs_capacity_bytes=CAPACITY,
                registry_id=wrong.id,
            )
        assert auth_failure.search(str(e.value)), str(e.value)

        registry_name = unique_name("reg")
        registry = gen.sandboxes.registries.create(
            name=registry_name, url=registries.auth, username=registries.username, password=registries.password,
        )
        created.append(registry_name)
        assert_uuid(registry.id)
        # Credentials are stored, never returned.
        for shown in (registry, gen.sandboxes.registries.retrieve(registry_name)):
            assert shown.name == registry_name
            dumped = shown.to_json()
            assert registries.password not in dumped and "password" not in dumped, dumped
        # A registry serving another host is refused up front.
        with pytest.raises(SandboxClientError):
            client.create_snapshot(
                snapshot_names("snap-otherhost"), docker_image=registries.image("busybox"),
                fs_capacity_bytes=CAPACITY, registry_id=registry.id,
            )

        snap = client.create_snapshot(
            snapshot_names("snap-private"), docker_image=reference, fs_capacity_bytes=CAPACITY,
            registry_id=registry.id, tag="v1",
        )
        assert snap.status == "ready"
        assert snap.registry_id == registry.id
        assert snap.tags == ["v1"]
        sb = make_sandbox(snapshot=f"{snap.name}:v1")
        assert sb.snapshot_id == snap.id
        greeting, cwd, uid, banner = image_identity(sb)
        assert (greeting, cwd, uid) == ("hello-from-image", "/srv/app", "1000")
        assert banner.startswith("BusyBox"), banner
    finally:
        for name in created:
            try:
                gen.sandboxes.registries.delete(name)
            except Exception:  # noqa: BLE001 - best effort; the data dir goes at the end anyway
                pass
        gen.close()


@pytest.mark.parametrize("key", ["multiarch", "zstd"])
def test_build_index_and_zstd_images(client, registries, make_sandbox, snapshot_names, key):
    # `multiarch` is an index listing linux/arm64 first: the server must pick linux/amd64.
    snap = client.create_snapshot(snapshot_names(f"snap-{key}"), docker_image=registries.image(key), fs_capacity_bytes=CAPACITY)
    assert snap.image_digest and SHA256_DIGEST.match(snap.image_digest), snap.image_digest
    sb = make_sandbox(snapshot_id=snap.id)
    greeting, cwd, uid, banner = image_identity(sb)
    assert (greeting, cwd, uid) == ("hello-from-image", "/srv/app", "1000")
    assert banner.startswith("BusyBox"), banner
    assert sb.read(APP_FILE) == APP_FILE_CONTENT
    assert sb.run("test -e /ARCH").exit_code == 1, "the arm64 image's file must not be there"


def test_build_applies_whiteouts_and_opaque_dirs(client, registries, make_sandbox, snapshot_names):
    snap = client.create_snapshot(
        snapshot_names("snap-whiteout"), docker_image=registries.image("whiteout"), fs_capacity_bytes=CAPACITY,
    )
    sb = make_sandbox(snapshot_id=snap.id)
    listing = sb.run("ls -A /opt /opt/olddir && cat /opt/olddir/new.txt")
    assert listing.exit_code == 0, listing.stderr
    assert listing.stdout == "/opt:\nolddir\n\n/opt/olddir:\nnew.txt\nnew\n", listing.stdout


def test_run_config_override_at_build(root_snapshot, make_sandbox):
    rc = root_snapshot.run_config
    assert rc is not None
    # `user` replaces the image's; the image's work dir and env stay.
    assert (rc.user, rc.work_dir) == ("0", "/srv/app")
    assert (rc.env_vars or {}).get("GREETING") == "hello-from-image"
    sb = make_sandbox(snapshot_id=root_snapshot.id)
    greeting, cwd, uid, _ = image_identity(sb)
    assert (greeting, cwd, uid) == ("hello-from-image", "/srv/app", "0")


def test_plain_http_needs_insecure_registry(client, registries, snapshot_names):
    # The same open registry under a name the operator did not mark insecure: the server must not
    # fall back to plain HTTP, so the build fails (it would speak TLS to a plain-HTTP server).
    port = registries.open.rsplit(":", 1)[1]
    reference = registries.image("busybox").replace(registries.open, f"localhost:{port}", 1)
    with pytest.raises(ResourceCreationError) as e:
        client.create_snapshot(snapshot_names("snap-insecure"), docker_image=reference, fs_capacity_bytes=CAPACITY)
    assert re.search(r"insecure|plain http|tls|https|certificate", str(e.value), re.I), str(e.value)


@pytest.mark.parametrize(
    "case", ["missing-image", "missing-tag", "malicious"],
)
def test_failed_build_reports_why(client, cordon, registries, snapshot_names, case):
    if case == "missing-image":
        reference = f"{registries.open}/cordon-tests/does-not-exist:1"
    elif case == "missing-tag":
        reference = registries.image("busybox").rsplit(":", 1)[0] + ":no-such-tag"
    else:
        reference = registries.image("malicious")
    name = snapshot_names("snap-fail")
    with pytest.raises(ResourceCreationError) as e:
        client.create_snapshot(name, docker_image=reference, fs_capacity_bytes=CAPACITY)
    message = str(e.value)
    assert message and message != "Snapshot build failed", "the failure must say why"
    if case == "malicious":
        # The layer's tar-slip entry `../escape` is refused, and nothing of it lands on the host.
        assert re.search(r"escape|refused|unsafe|outside", message, re.I), message
        assert not list(cordon.data_dir.rglob("escape")), "the tar-slip entry landed in the data dir"
    else:
        assert re.search(r"not found|unknown|404|no such|does not exist", message, re.I), message
    # The failed snapshot stays visible with its reason.
    [failed] = [s for s in client.list_snapshots(name_contains=name) if s.name == name]
    assert failed.status == "failed"
    assert failed.status_message
    with pytest.raises(SandboxClientError):
        client.create_sandbox(snapshot_id=failed.id, timeout=30)


# ---------------------------------------------------------------------------- capture


def test_capture_carries_the_persistent_filesystem(client, busybox_snapshot, make_sandbox, snapshot_names):
    sb = make_sandbox(snapshot_id=busybox_snapshot.id)
    as_root(
        sb,
        "mkdir -p /data && echo captured > /data/f && chown 1000:1000 /data/f && "
        f"echo added > /srv/app/added.txt && rm {APP_FILE} && echo in-tmp > /tmp/t",
    )
    sb.write("/home/user/notes/by-client.txt", b"as the image's user")
    sb.write("/tmp/written-by-client", b"tmp too")

    name = snapshot_names("snap-capture")
    cap = client.capture_snapshot(sb.name, name)
    assert_uuid(cap.id)
    assert cap.id != busybox_snapshot.id
    assert cap.status == "ready"
    assert cap.name == name
    assert cap.source_sandbox_id == sb.id
    assert cap.tags == ["latest"]
    # The captured sandbox goes on working.
    assert sb.run("cat /data/f").stdout == "captured\n"

    second = make_sandbox(snapshot=name)
    assert second.snapshot_id == cap.id
    assert second.run("cat /data/f && stat -c %u:%g /data/f").stdout == "captured\n1000:1000\n"
    assert second.read("/srv/app/added.txt") == b"added\n"
    assert second.run("cat /home/user/notes/by-client.txt && stat -c %u /home/user/notes/by-client.txt").stdout == (
        "as the image's user1000\n"
    )
    assert second.run(f"test -e {APP_FILE}").exit_code == 1, "a deletion is captured too"
    assert second.run("test -e /tmp/t || test -e /tmp/written-by-client").exit_code == 1, "/tmp is not captured"
    # Still the image underneath, with its config.
    greeting, cwd, uid, banner = image_identity(second)
    assert (greeting, cwd, uid) == ("hello-from-image", "/srv/app", "1000")
    assert banner.startswith("BusyBox")


def test_capture_of_missing_sandbox(client):
    with pytest.raises(ResourceNotFoundError) as e:
        client.capture_snapshot(unique_name("missing"), unique_name("snap"))
    assert e.value.resource_type == "sandbox"


# ---------------------------------------------------------------------------- names and tags


def test_tag_moves_to_the_newest_capture(client, busybox_snapshot, make_sandbox, snapshot_names):
    sb = make_sandbox(snapshot_id=busybox_snapshot.id)
    name = snapshot_names("snap-tags")
    as_root(sb, "echo one > /version")
    first = client.capture_snapshot(sb.name, name, tag="stable")
    assert first.tags == ["stable"]
    as_root(sb, "echo two > /version")
    second = client.capture_snapshot(sb.name, name, tag="stable")
    assert second.id != first.id
    assert second.tags == ["stable"]

    assert client.get_snapshot(f"{name}:stable").id == second.id
    old = client.get_snapshot(first.id)
    assert (old.status, old.tags) == ("ready", []), "the old snapshot is dangling but still addressable by id"
    # Both stay usable: the tag gives the newest, the id the old one.
    assert make_sandbox(snapshot=f"{name}:stable").run("cat /version").stdout == "two\n"
    assert make_sandbox(snapshot_id=first.id).run("cat /version").stdout == "one\n"

    third = client.capture_snapshot(sb.name, name, tag="v1")
    tags = sorted((t.tag, t.snapshot_id) for t in client.list_snapshot_tags(name))
    assert tags == sorted([("stable", second.id), ("v1", third.id)])
    # There is no `name:latest`, so a bare name falls back to the newest ready untagged snapshot
    # of that name (§2.3.2): `first`, which lost its only tag.
    assert client.get_snapshot(name).id == first.id


def test_snapshot_tags_errors(client):
    with pytest.raises(ResourceNotFoundError):
        client.list_snapshot_tags(unique_name("never-published"))
    with pytest.raises(SandboxClientError) as e:
        client.list_snapshot_tags("has-a:tag")
    assert not isinstance(e.value, ResourceNotFoundError), "a name carrying a tag is a bad request (§2.3.5)"


def test_get_by_id_name_and_name_tag(client, registries, make_sandbox, snapshot_names):
    # A name with a `/` travels as %2F in the path (§2.3.2).
    name = "cordon-tests/" + snapshot_names("snap-get")
    try:
        snap = client.create_snapshot(
            name, docker_image=registries.image("busybox"), fs_capacity_bytes=CAPACITY, tag="latest",
        )
        assert snap.name == name
        for ref in (snap.id, name, f"{name}:latest"):
            got = client.get_snapshot(ref)
            assert (got.id, got.name, got.status, got.tags) == (snap.id, name, "ready", ["latest"]), ref
        assert [t.tag for t in client.list_snapshot_tags(name)] == ["latest"]
        assert make_sandbox(snapshot=name).snapshot_id == snap.id
        for missing in (str(uuid.uuid4()), f"{name}:no-such-tag", unique_name("no-such-name")):
            with pytest.raises(ResourceNotFoundError) as e:
                client.get_snapshot(missing)
            assert e.value.resource_type == "snapshot"
        # DELETE accepts name:tag too (§2.3.4).
        client.delete_snapshot(f"{name}:latest")
        with pytest.raises(ResourceNotFoundError):
            client.get_snapshot(snap.id)
    finally:
        delete_snapshots_named(client, name)


def test_list_filters_and_pages(client, registries, snapshot_names):
    prefix = snapshot_names("snap-list")
    names = [f"{prefix}-{i}" for i in range(3)]
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            built = list(pool.map(
                lambda n: client.create_snapshot(n, docker_image=registries.image("busybox"), fs_capacity_bytes=CAPACITY),
                names,
            ))
        ids = {s.id for s in built}
        assert {s.id for s in client.list_snapshots(name_contains=prefix)} == ids
        assert {s.id for s in client.list_snapshots(name_contains=prefix.upper())} == ids, "case-insensitive"
        pages = [client.list_snapshots(name_contains=prefix, limit=2, offset=o) for o in (0, 2, 4)]
        assert [len(p) for p in pages] == [2, 1, 0]
        paged = [s.id for p in pages for s in p]
        assert sorted(paged) == sorted(ids), "every snapshot exactly once across pages"
        assert all(s.status == "ready" for p in pages for s in p)
        for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}):
            with pytest.raises(SandboxClientError):
                client.list_snapshots(name_contains=prefix, **bad)
        assert len(client.list_snapshots(limit=1)) == 1
    finally:
        for n in names:
            delete_snapshots_named(client, n)


# ---------------------------------------------------------------------------- delete while in use


def test_delete_while_in_use(client, registries, make_sandbox, snapshot_names):
    name = snapshot_names("snap-del")
    snap = client.create_snapshot(name, docker_image=registries.image("busybox"), fs_capacity_bytes=CAPACITY)
    sb = make_sandbox(snapshot_id=snap.id)
    as_root(sb, "echo mine > /srv/app/mine.txt")

    client.delete_snapshot(snap.id)
    with pytest.raises(ResourceNotFoundError):
        client.get_snapshot(snap.id)
    assert snap.id not in {s.id for s in client.list_snapshots(name_contains=name)}
    with pytest.raises(ResourceNotFoundError):
        client.delete_snapshot(snap.id)
    with pytest.raises(ResourceNotFoundError):
        client.create_sandbox(snapshot_id=snap.id, timeout=30)
    with pytest.raises(ResourceNotFoundError):
        client.create_sandbox(snapshot=name, timeout=30)

    # The sandbox keeps its image, also across a stop/start.
    assert image_identity(sb)[0] == "hello-from-image"
    client.stop_sandbox(sb.name)
    wait_for_status(client, sb.name, "stopped")
    again = client.start_sandbox(sb.name, timeout=120)
    greeting, cwd, uid, banner = image_identity(again)
    assert (greeting, cwd, uid) == ("hello-from-image", "/srv/app", "1000")
    assert banner.startswith("BusyBox")
    assert again.read("/srv/app/mine.txt") == b"mine\n"


# ---------------------------------------------------------------------------- quota, stop/start


def test_disk_quota_gives_enospc_and_the_sandbox_survives(root_snapshot, make_sandbox):
    sb = make_sandbox(snapshot_id=root_snapshot.id)
    if sb.fs_capacity_bytes is not None:
        assert sb.fs_capacity_bytes == CAPACITY
    small = sb.run("dd if=/dev/zero of=/small bs=1M count=4 2>&1 && sync")
    assert small.exit_code == 0, small.stdout
    fill = sb.run(f"dd if=/dev/zero of=/fill bs=1M count={2 * CAPACITY // MIB}")
    assert fill.exit_code != 0, "writing past fs_capacity_bytes must fail"
    assert "No space left on device" in fill.stderr, fill.stderr
    # Nothing broken: free the space and go on.
    after = sb.run("rm /fill && echo ok > /after.txt && cat /after.txt && busybox true")
    assert (after.exit_code, after.stdout) == (0, "ok\n"), after.stderr
    assert sb.read("/small") == bytes(4 * MIB)


def test_stop_start_keeps_files_and_quota(client, root_snapshot, make_sandbox):
    sb = make_sandbox(snapshot_id=root_snapshot.id)
    sb.write("/srv/app/kept.txt", "survives a stop\n")
    as_root(sb, "mkdir -p /var/kept && echo from-exec > /var/kept/x && echo gone > /tmp/t")
    client.stop_sandbox(sb.name)
    wait_for_status(client, sb.name, "stopped")
    again = client.start_sandbox(sb.name, timeout=120)
    assert again.read("/srv/app/kept.txt") == b"survives a stop\n"
    assert again.run("cat /var/kept/x").stdout == "from-exec\n"
    assert again.run("test -e /tmp/t").exit_code == 1, "/tmp is a fresh tmpfs after a start"
    assert image_identity(again)[:3] == ["hello-from-image", "/srv/app", "0"]
    fill = again.run(f"dd if=/dev/zero of=/fill bs=1M count={2 * CAPACITY // MIB}; rm -f /fill")
    assert "No space left on device" in fill.stderr, "the quota holds after a restart"


def test_cordon_snapshot_import_cli(client, cordon, registries, snapshot_names, tmp_path):
    """`cordon snapshot import` (issue 4: images without a registry) with a real `docker save`
    style archive written by skopeo; a sandbox from the imported snapshot runs the image."""
    import subprocess

    archive = tmp_path / "busybox.tar"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         f"docker://{registries.image('busybox')}", f"docker-archive:{archive}:tools/busybox:1"],
        check=True, capture_output=True, timeout=120,
    )
    name = snapshot_names("imported")
    cli = [str(cordon.binary), "snapshot", "import", "--endpoint", cordon.endpoint, "--api-key", cordon.api_key]
    done = subprocess.run(
        [*cli, str(archive), "--name", f"{name}:v1", "--fs-capacity-bytes", str(CAPACITY)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    snapshot_id = done.stdout.strip().splitlines()[-1]
    assert_uuid(snapshot_id)
    snapshot = client.get_snapshot(f"{name}:v1")
    assert (snapshot.id, snapshot.status) == (snapshot_id, "ready")
    sb = client.create_sandbox(snapshot_id=snapshot_id)
    try:
        assert sb.run("cat hello.txt; echo $GREETING").stdout == APP_FILE_CONTENT.decode() + "hello-from-image\n"
    finally:
        client.delete_sandbox(sb.name)

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not an archive" * 100)
    failed = subprocess.run(
        [*cli, str(garbage), "--name", f"{name}:bad", "--fs-capacity-bytes", str(CAPACITY)],
        capture_output=True, text=True, timeout=180,
    )
    assert failed.returncode != 0
    assert failed.stderr.strip(), "a failed import says why"
    with pytest.raises(ResourceNotFoundError):
        client.get_snapshot(f"{name}:bad")
