// Control plane through the official JS client (spec §2.2, error mapping §1.6).
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, makeSandbox, NO_RUN_CONFIG, otherClient, sdk, SandboxClient, uniqueName, text } from "../harness/common.mjs";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const c = client();

test("create, get, list, delete", async () => {
  const name = uniqueName("crud");
  const sb = await c.createSandbox({ name, timeout: 120 });
  try {
    assert.equal(sb.name, name);
    assert.match(sb.id, UUID);
    assert.equal(sb.status, "ready");
    assert.match(sb.dataplane_url, /^http:\/\/127\.0\.0\.1:\d+\/\S+[^/]$/);
    assert.ok(sb instanceof sdk.Sandbox);

    const got = await c.getSandbox(name);
    assert.equal(got.id, sb.id);
    assert.equal(got.name, name);
    assert.equal(got.status, "ready");
    assert.equal(got.dataplane_url, sb.dataplane_url);

    const listed = (await c.listSandboxes()).filter((s) => s.name === name);
    assert.equal(listed.length, 1);
    assert.equal(listed[0].id, sb.id);
    assert.ok(listed[0] instanceof sdk.Sandbox);
  } finally {
    await c.deleteSandbox(name);
  }
  await assert.rejects(c.getSandbox(name), (e) => e instanceof sdk.LangSmithResourceNotFoundError && e.resourceType === "sandbox");
  assert.ok(!(await c.listSandboxes()).some((s) => s.name === name));
  await assert.rejects(c.deleteSandbox(name), sdk.LangSmithResourceNotFoundError);
});

test("create without a name gets a generated one; Sandbox.delete()", async () => {
  const sb = await c.createSandbox({ timeout: 120 });
  assert.equal(typeof sb.name, "string");
  assert.ok(sb.name.length > 0);
  assert.equal((await c.getSandbox(sb.name)).id, sb.id);
  await sb.delete();
  await assert.rejects(c.getSandbox(sb.name), sdk.LangSmithResourceNotFoundError);
});

test("waitForReady:false then waitForSandbox / getSandboxStatus", async () => {
  const name = uniqueName("nowait");
  const sb = await c.createSandbox({ name, waitForReady: false });
  try {
    assert.equal(sb.name, name);
    assert.ok(["provisioning", "ready"].includes(sb.status), sb.status);
    const ready = await c.waitForSandbox(name, { timeout: 120 });
    assert.equal(ready.status, "ready");
    const st = await c.getSandboxStatus(name);
    assert.equal(st.status, "ready");
    assert.equal((await (await c.getSandbox(name)).run("echo ok")).stdout, "ok\n");
  } finally {
    await c.deleteSandbox(name);
  }
});

test("get by id works like get by name", async () => {
  const sb = await makeSandbox();
  const byId = await c.getSandbox(sb.id);
  assert.equal(byId.name, sb.name);
  assert.equal(byId.id, sb.id);
});

test("rename and update", async () => {
  const sb = await makeSandbox({ idleTtlSeconds: 600 });
  assert.equal(sb.idle_ttl_seconds, 600);
  const newName = uniqueName("renamed");
  const renamed = await c.updateSandbox(sb.name, newName);
  try {
    assert.equal(renamed.name, newName);
    assert.equal(renamed.id, sb.id);
    await assert.rejects(c.getSandbox(sb.name), sdk.LangSmithResourceNotFoundError);
    assert.equal((await c.getSandbox(newName)).id, sb.id);

    const updated = await c.updateSandbox(newName, { idleTtlSeconds: 1200, deleteAfterStopSeconds: 3600 });
    assert.equal(updated.name, newName);
    assert.equal(updated.idle_ttl_seconds, 1200);
    assert.equal(updated.delete_after_stop_seconds, 3600);
    const got = await c.getSandbox(newName);
    assert.equal(got.idle_ttl_seconds, 1200);
    assert.equal(got.delete_after_stop_seconds, 3600);

    // No fields: the JS client does a GET instead of PATCH {} (spec §10).
    assert.equal((await c.updateSandbox(newName, {})).id, sb.id);
  } finally {
    await c.deleteSandbox(newName).catch(() => {});
  }
});

test("update runConfig affects later commands", { skip: NO_RUN_CONFIG }, async () => {
  const sb = await makeSandbox();
  const updated = await c.updateSandbox(sb.name, { runConfig: { work_dir: "/tmp", env_vars: { JSU: "v1" } } });
  assert.equal(updated.run_config?.work_dir, "/tmp");
  assert.equal((await sb.run('pwd; echo "$JSU"')).stdout, "/tmp\nv1\n");
  // env_vars merge key by key, work_dir replaces
  await c.updateSandbox(sb.name, { runConfig: { env_vars: { JSU2: "v2" } } });
  assert.equal((await sb.run('pwd; echo "$JSU $JSU2"')).stdout, "/tmp\nv1 v2\n");
});

test("rename onto a taken name -> LangSmithResourceNameConflictError", async () => {
  const a = await makeSandbox();
  const b = await makeSandbox();
  await assert.rejects(c.updateSandbox(a.name, b.name), sdk.LangSmithResourceNameConflictError);
  assert.equal((await c.getSandbox(a.name)).id, a.id);
});

test("update a missing sandbox -> LangSmithResourceNotFoundError", async () => {
  await assert.rejects(c.updateSandbox(uniqueName("missing"), { idleTtlSeconds: 60 }), sdk.LangSmithResourceNotFoundError);
});

test("wrong API key -> LangSmithSandboxAuthenticationError (401)", async () => {
  const bad = new SandboxClient({ apiKey: "ck-wrong-key" });
  await assert.rejects(bad.listSandboxes(), sdk.LangSmithSandboxAuthenticationError);
  await assert.rejects(bad.createSandbox({ name: uniqueName("badkey"), timeout: 30 }), sdk.LangSmithSandboxAuthenticationError);
  // the status the server answered
  const r = await fetch(`${process.env.LANGSMITH_ENDPOINT}/v2/sandboxes/boxes`, { headers: { "X-Api-Key": "ck-wrong-key" } });
  assert.equal(r.status, 401);
  const noKey = await fetch(`${process.env.LANGSMITH_ENDPOINT}/v2/sandboxes/boxes`);
  assert.equal(noKey.status, 401);
});

test("wrong API key on the data plane is rejected", async () => {
  const sb = await makeSandbox();
  const bad = new SandboxClient({ apiKey: "ck-wrong-key" });
  const foreign = new sdk.Sandbox({ ...sb, name: sb.name, dataplane_url: sb.dataplane_url }, bad);
  // Data-plane 401 maps to the generic error (JS handleSandboxHttpError, spec §1.6 C).
  await assert.rejects(foreign.read("/etc/hostname"), (e) => e instanceof sdk.LangSmithSandboxError && /X-Api-Key/i.test(e.message));
  // (writes: see the /upload test below)
  // A rejected /execute/ws upgrade (401) -> LangSmithSandboxConnectionError, not retried (spec §3.3.1).
  const t0 = Date.now();
  await assert.rejects(foreign.run("echo hi"), (e) => e instanceof sdk.LangSmithSandboxConnectionError && /401/.test(e.message));
  assert.ok(Date.now() - t0 < 2000, "a 401 upgrade must not be retried");
  const r = await fetch(`${sb.dataplane_url}/download?path=/etc/hostname`, { headers: { "X-Api-Key": "ck-wrong-key" } });
  assert.equal(r.status, 401);
});

// A rejected upload: the server reads (a bounded amount of) the body before answering, so
// Node's fetch, still sending the form data, reads the 401/404 instead of failing with EPIPE.
test("a rejected /upload answers 401/404 instead of dropping the connection", async () => {
  const sb = await makeSandbox();
  const cases = [
    ["wrong key", "ck-wrong-key", (e) => e instanceof sdk.LangSmithSandboxError && /X-Api-Key/i.test(e.message)],
    ["other workspace", process.env.CORDON_OTHER_API_KEY, (e) => e instanceof sdk.LangSmithResourceNotFoundError],
  ];
  const wrong = [];
  for (const [label, apiKey, ok] of cases) {
    const foreign = new sdk.Sandbox({ ...sb }, new SandboxClient({ apiKey, maxRetries: 0 }));
    for (const size of [1, 65536]) {
      for (let i = 0; i < 5; i++) {
        try {
          await foreign.write("/tmp/x", new Uint8Array(size));
          wrong.push(`${label} ${size} B: accepted`);
        } catch (e) {
          if (!ok(e)) wrong.push(`${label} ${size} B: ${e?.name}: ${e?.message} (${e?.cause?.code ?? ""})`);
        }
      }
    }
  }
  assert.deepEqual(wrong, []);
});

test("another workspace's sandbox is 404", async () => {
  const sb = await makeSandbox();
  const other = otherClient();
  await assert.rejects(other.getSandbox(sb.name), sdk.LangSmithResourceNotFoundError);
  await assert.rejects(other.deleteSandbox(sb.name), sdk.LangSmithResourceNotFoundError);
  await assert.rejects(other.updateSandbox(sb.name, { idleTtlSeconds: 60 }), sdk.LangSmithResourceNotFoundError);
  assert.ok(!(await other.listSandboxes()).some((s) => s.name === sb.name));
  // the same name is free in the other workspace
  const theirs = await makeSandbox({ name: sb.name }, other);
  assert.notEqual(theirs.id, sb.id);
  await sb.write("/tmp/who", "one");
  await theirs.write("/tmp/who", "two");
  assert.equal(text(await sb.read("/tmp/who")), "one");
  assert.equal(text(await theirs.read("/tmp/who")), "two");
  // the other workspace's key cannot use this sandbox's data plane either
  const foreign = new sdk.Sandbox({ ...sb, dataplane_url: sb.dataplane_url, name: sb.name }, other);
  await assert.rejects(foreign.read("/tmp/who"), sdk.LangSmithSandboxError);
  await assert.rejects(c.getSandbox(uniqueName("never")), sdk.LangSmithResourceNotFoundError);
});

for (const [label, options, fields, skip] of [
  ["vcpus -1", { vCpus: -1 }, ["vcpus"]],
  ["memBytes -1", { memBytes: -1 }, ["mem_bytes"]],
  ["fsCapacityBytes -1", { fsCapacityBytes: -1 }, ["fs_capacity_bytes"]],
  ["relative run_config.work_dir", { runConfig: { work_dir: "relative/dir" } }, ["work_dir", "run_config"], NO_RUN_CONFIG],
]) {
  test(`invalid create field (${label}) -> LangSmithValidationError`, { skip }, async () => {
    const name = uniqueName("invalid");
    await assert.rejects(c.createSandbox({ name, timeout: 30, ...options }), (e) => {
      assert.ok(e instanceof sdk.LangSmithValidationError, `${e?.name}: ${e?.message}`);
      assert.ok(fields.includes(e.field), `field ${e.field}, details ${JSON.stringify(e.details)}`);
      return true;
    });
    assert.ok(!(await c.listSandboxes()).some((s) => s.name === name));
  });
}

test("invalid update field -> LangSmithValidationError, nothing changed", { skip: NO_RUN_CONFIG }, async () => {
  const sb = await makeSandbox();
  await assert.rejects(c.updateSandbox(sb.name, { runConfig: { work_dir: "not/absolute" } }), sdk.LangSmithValidationError);
  assert.equal((await sb.run("pwd")).stdout, "/home/user\n");
});

test("client-side TTL validation -> LangSmithValidationError (no request)", async () => {
  await assert.rejects(c.createSandbox({ name: uniqueName("ttl"), idleTtlSeconds: 61 }), sdk.LangSmithValidationError);
});
