// Templates, pools and boxes from a template through the legacy JS client (langsmith 0.5.5,
// spec §2.8): its own calls, error mapping and HTTP-only data plane (`POST /execute`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, makePool, makeTemplate, otherClient, poolCounts, READY_TIMEOUT, sdk, track, uniqueName, waitPool } from "../common.mjs";

const c = client();

test("template create, get, list, rename, delete", async () => {
  const t = await makeTemplate(c, { cpu: "1", memory: "512Mi" });
  assert.equal(t.image, "system/default");
  assert.deepEqual([t.resources.cpu, t.resources.memory], ["1", "512Mi"]);
  assert.ok(t.id && t.created_at);
  const got = await c.getTemplate(t.name);
  assert.equal(got.id, t.id);
  assert.ok((await c.listTemplates()).some((x) => x.id === t.id));

  const newName = uniqueName("tmpl-renamed");
  const renamed = await c.updateTemplate(t.name, { newName });
  track(c, "template", newName);
  assert.deepEqual([renamed.id, renamed.name], [t.id, newName]);
  await assert.rejects(c.getTemplate(t.name), (e) => e instanceof sdk.LangSmithResourceNotFoundError && e.resourceType === "template");

  const other = await makeTemplate(c);
  await assert.rejects(c.updateTemplate(other.name, { newName }), sdk.LangSmithResourceNameConflictError);

  await c.deleteTemplate(newName);
  await assert.rejects(c.getTemplate(newName), sdk.LangSmithResourceNotFoundError);
  await assert.rejects(c.deleteTemplate(newName), sdk.LangSmithResourceNotFoundError);
});

test("box from a template: run over HTTP /execute, write, read, delete", async () => {
  const t = await makeTemplate(c);
  const name = uniqueName("box");
  const sb = await c.createSandbox(t.name, { name, timeout: READY_TIMEOUT });
  track(c, "sandbox", name);
  assert.equal(sb.name, name);
  assert.equal(sb.template_name, t.name);
  assert.ok(sb.dataplane_url);
  const r = await sb.run("echo legacy-ok");
  assert.equal(r.exit_code, 0);
  assert.equal(r.stdout, "legacy-ok\n");
  await sb.write("/tmp/legacy.txt", "payload");
  assert.equal(new TextDecoder().decode(await sb.read("/tmp/legacy.txt")), "payload");
  await c.deleteSandbox(name);
  await assert.rejects(c.getSandbox(name), sdk.LangSmithResourceNotFoundError);
});

test("pool: wait_for_ready, a box claims a warm sandbox, the pool refills, update, delete", async () => {
  const t = await makeTemplate(c);
  const pool = await makePool(c, t.name, 2);
  assert.deepEqual([pool.template_name, pool.replicas], [t.name, 2]);
  assert.ok(pool.id);
  assert.equal((await c.getPool(pool.name)).id, pool.id);
  assert.ok((await c.listPools()).some((p) => p.id === pool.id));
  const before = await poolCounts(pool.name);
  assert.equal(before.ready, 2, JSON.stringify(before));

  const name = uniqueName("pooled");
  const sb = await c.createSandbox(t.name, { name, timeout: READY_TIMEOUT });
  track(c, "sandbox", name);
  const after = await poolCounts(pool.name);
  assert.equal(after.claimed, before.claimed + 1, JSON.stringify([before, after]));
  assert.equal((await sb.run("echo ok")).stdout, "ok\n");
  await waitPool(pool.name, (b) => b.ready === 2);

  const updated = await c.updatePool(pool.name, { replicas: 1 });
  assert.deepEqual([updated.id, updated.replicas], [pool.id, 1]);
  await waitPool(pool.name, (b) => b.ready === 1);
  await c.deletePool(pool.name);
  await assert.rejects(c.getPool(pool.name), (e) => e instanceof sdk.LangSmithResourceNotFoundError && e.resourceType === "pool");
});

test("errors: template not found, pool exists, template in use", async () => {
  await assert.rejects(c.createPool(uniqueName("pool"), { templateName: uniqueName("missing"), replicas: 1, timeout: 30 }),
    (e) => e instanceof sdk.LangSmithResourceNotFoundError && e.resourceType === "template");
  await assert.rejects(c.createSandbox(uniqueName("missing"), { timeout: 30 }), sdk.LangSmithResourceNotFoundError);

  const t = await makeTemplate(c);
  const pool = await makePool(c, t.name, 1);
  await assert.rejects(c.createPool(pool.name, { templateName: t.name, replicas: 1, timeout: 30 }),
    (e) => e instanceof sdk.LangSmithResourceAlreadyExistsError && e.resourceType === "pool");
  await assert.rejects(c.deleteTemplate(t.name), (e) => e instanceof sdk.LangSmithResourceInUseError && e.resourceType === "template");
  assert.equal((await c.getTemplate(t.name)).id, t.id);
});

test("another workspace sees neither the template nor the pool", async () => {
  const t = await makeTemplate(c);
  const pool = await makePool(c, t.name, 1);
  const o = otherClient();
  await assert.rejects(o.getTemplate(t.name), sdk.LangSmithResourceNotFoundError);
  await assert.rejects(o.getPool(pool.name), sdk.LangSmithResourceNotFoundError);
  assert.ok(!(await o.listPools()).some((p) => p.name === pool.name));
  await assert.rejects(o.createSandbox(t.name, { timeout: 30 }), sdk.LangSmithResourceNotFoundError);
});
