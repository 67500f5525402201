// Snapshots through the official JS client (spec §2.3.1, §2.2.11): build from the open test
// registry (run.mjs started it and gave the server --insecure-registry for it), a sandbox from the
// snapshot runs the image's busybox with the image's env, work dir and user; capture, then a second
// sandbox sees the captured files but not /tmp. Both pinned sets (0.12.0, 0.9.0) have
// createSnapshot/captureSnapshot/getSnapshot/listSnapshots/deleteSnapshot, so nothing is skipped.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { client, makeSandboxFrom, registries, sdk, text, uniqueName } from "../harness/common.mjs";

const CAPACITY = 64 * 1024 * 1024;
const c = client();
const snapshots = [];
after(async () => {
  for (const id of snapshots.splice(0)) {
    try { await c.deleteSnapshot(id); } catch { /* already gone */ }
  }
});

// The busybox image (see cordon_testkit::registry): Env GREETING=hello-from-image, WorkingDir
// /srv/app holding hello.txt, User 1000 whose home /home/user it may write.
let built;
function busyboxSnapshot() {
  built ??= c.createSnapshot(uniqueName("jssnap"), registries().images.busybox, CAPACITY).then((s) => {
    snapshots.push(s.id);
    return s;
  });
  return built;
}

async function imageIdentity(sb) {
  const r = await sb.run('printf "%s\\n" "$GREETING" "$(pwd)" "$(id -u)" && busybox | head -n 1');
  assert.equal(r.exit_code, 0, r.stderr);
  return r.stdout.split("\n").slice(0, 4);
}

test("createSnapshot from a registry image; a sandbox from it runs the image", async () => {
  const image = registries().images.busybox;
  const snap = await busyboxSnapshot();
  assert.equal(snap.status, "ready");
  assert.match(snap.name, /^jssnap-/);
  assert.equal(snap.docker_image, image);
  assert.match(snap.image_digest ?? "", /^sha256:[0-9a-f]{64}$/);
  assert.equal(snap.fs_capacity_bytes, CAPACITY);
  assert.equal(snap.run_config?.user, "1000");
  assert.equal(snap.run_config?.work_dir, "/srv/app");
  assert.equal(snap.run_config?.env_vars?.GREETING, "hello-from-image");
  assert.equal((await c.getSnapshot(snap.id)).id, snap.id);
  assert.ok((await c.listSnapshots({ nameContains: snap.name })).some((s) => s.id === snap.id));

  const sb = await makeSandboxFrom(snap.id);
  assert.equal(sb.snapshot_id, snap.id);
  const [greeting, cwd, uid, banner] = await imageIdentity(sb);
  assert.deepEqual([greeting, cwd, uid], ["hello-from-image", "/srv/app", "1000"]);
  assert.match(banner, /^BusyBox/);
  assert.equal(text(await sb.read("/srv/app/hello.txt")), "hello from /srv/app\n");
});

test("captureSnapshot: a second sandbox sees the captured files, not /tmp", async () => {
  const sb = await makeSandboxFrom((await busyboxSnapshot()).id);
  await sb.write("/home/user/captured/data.txt", "captured\n");
  await sb.run("echo from-exec > /home/user/captured/exec.txt && echo gone > /tmp/not-captured");
  const name = uniqueName("jscapsnap");
  const cap = await c.captureSnapshot(sb.name, name);
  snapshots.push(cap.id);
  assert.equal(cap.status, "ready");
  assert.equal(cap.name, name);
  assert.equal(cap.source_sandbox_id, sb.id);

  const second = await makeSandboxFrom(cap.id);
  assert.equal(second.snapshot_id, cap.id);
  assert.equal(text(await second.read("/home/user/captured/data.txt")), "captured\n");
  assert.equal((await second.run("cat /home/user/captured/exec.txt")).stdout, "from-exec\n");
  assert.equal((await second.run("test -e /tmp/not-captured")).exit_code, 1, "/tmp is not captured");
  assert.deepEqual((await imageIdentity(second)).slice(0, 3), ["hello-from-image", "/srv/app", "1000"]);
});

test("a failed build rejects with the server's reason", async () => {
  const { open } = registries();
  const name = uniqueName("jsfail");
  const err = await c.createSnapshot(name, `${open}/cordon-tests/does-not-exist:1`, CAPACITY).then(
    () => assert.fail("a build from a missing image must fail"), (e) => e);
  assert.ok(err instanceof sdk.LangSmithResourceCreationError, String(err));
  assert.notEqual(err.message, "", "the failure must say why");
  for (const s of await c.listSnapshots({ nameContains: name })) snapshots.push(s.id);
});
