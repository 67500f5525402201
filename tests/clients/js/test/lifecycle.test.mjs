// Stop/start through the official JS client (spec §2.2.7, §2.2.8).
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, makeSandbox, sdk, sleep, text, uniqueName } from "../harness/common.mjs";

const ISO_8601 = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d/;
const c = client();

async function waitForStatus(name, want, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = (await c.getSandboxStatus(name)).status;
    if (last === want) return;
    await sleep(250);
  }
  assert.fail(`sandbox ${name} not ${want} after ${timeoutMs} ms (last ${last})`);
}

test("stop/start keeps files (client methods)", async () => {
  const sb = await makeSandbox({ name: uniqueName("stopstart") });
  await sb.write("/home/user/keep/data.txt", "survives a stop\n");
  await sb.run("mkdir -p /home/user/keep/d && echo from-exec > /home/user/keep/d/x");

  const t0 = Date.now();
  await c.stopSandbox(sb.name);
  assert.ok(Date.now() - t0 < 10_000, "stop must answer promptly");
  await waitForStatus(sb.name, "stopped");
  const stopped = await c.getSandbox(sb.name);
  assert.equal(stopped.status, "stopped");
  assert.match(stopped.stopped_at ?? "", ISO_8601);
  assert.equal(stopped.dataplane_url, sb.dataplane_url, "dataplane_url must be stable across stop/start");

  const restarted = await c.startSandbox(sb.name, { timeout: 120 });
  assert.equal(restarted.status, "ready");
  assert.ok(!restarted.stopped_at, `stopped_at after start: ${restarted.stopped_at}`);
  assert.equal(restarted.dataplane_url, sb.dataplane_url);
  assert.equal(text(await restarted.read("/home/user/keep/data.txt")), "survives a stop\n");
  assert.equal((await restarted.run("cat /home/user/keep/d/x")).stdout, "from-exec\n");
});

test("Sandbox.stop() / Sandbox.start() keep files", async () => {
  const sb = await makeSandbox({ name: uniqueName("objstop") });
  await sb.write("/home/user/obj.txt", "obj");
  await sb.stop();
  assert.equal(sb.status, "stopped");
  await waitForStatus(sb.name, "stopped");
  await sb.start({ timeout: 120 });
  assert.equal(sb.status, "ready");
  assert.equal((await c.getSandboxStatus(sb.name)).status, "ready");
  assert.equal(text(await sb.read("/home/user/obj.txt")), "obj");
});

test("a data-plane request resumes a stopped sandbox", async () => {
  const sb = await makeSandbox({ name: uniqueName("resume") });
  await sb.write("/home/user/resume.txt", "resumed");
  await c.stopSandbox(sb.name);
  await waitForStatus(sb.name, "stopped");
  assert.equal(text(await sb.read("/home/user/resume.txt")), "resumed");
  assert.equal((await sb.run("cat /home/user/resume.txt")).stdout, "resumed");
  assert.equal((await c.getSandboxStatus(sb.name)).status, "ready");
});

test("start/stop a missing sandbox -> LangSmithResourceNotFoundError", async () => {
  await assert.rejects(c.stopSandbox(uniqueName("missing")), sdk.LangSmithResourceNotFoundError);
  await assert.rejects(c.startSandbox(uniqueName("missing"), { timeout: 5 }), sdk.LangSmithResourceNotFoundError);
});
