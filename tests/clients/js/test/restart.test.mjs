// Server restarts under a live JS client (each test runs its own `cordon serve`): the client's
// handle iteration auto-reconnects (spec §3.3.7: close 1001 -> LangSmithSandboxServerReloadError
// -> immediate reconnect; a dropped connection -> backoff 0.5, 1, 2, 4, 8 s) and must deliver the
// whole output exactly once; sandboxes and files survive.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SandboxClient, text, uniqueName } from "../harness/common.mjs";
import { CordonServer } from "../harness/server.mjs";

for (const signal of ["SIGTERM", "SIGKILL"]) {
  test(`a streaming handle survives a server restart (${signal})`, async (t) => {
    const server = new CordonServer();
    await server.start();
    let failed = true;
    t.after(async () => {
      // Sandboxes outlive `cordon serve`: delete what is left while it is still up.
      if (server.alive()) {
        for (const apiKey of [server.apiKey, server.otherApiKey]) {
          const owner = new SandboxClient({ apiEndpoint: `${server.url}/api/v2/sandboxes`, apiKey });
          for (const left of await owner.listSandboxes().catch(() => [])) await owner.deleteSandbox(left.name).catch(() => {});
        }
      }
      await server.stop();
      if (failed) t.diagnostic(server.logTail(120));
      server.cleanup({ keepLog: failed });
    });
    const c = new SandboxClient({ apiEndpoint: `${server.url}/api/v2/sandboxes`, apiKey: server.apiKey });
    const sb = await c.createSandbox({ name: uniqueName("restart"), timeout: 120 });
    await sb.write("/home/user/before-restart.txt", "kept");
    const n = 12;
    const h = await sb.run(`for i in $(seq 1 ${n}); do echo tick$i; sleep 0.25; done; exit 3`, { wait: false, timeout: 120 });
    const it = h[Symbol.asyncIterator]();
    const first = await it.next();
    assert.equal(first.value.data, "tick1\n");
    const chunks = [first.value];
    const restarted = server.restart(signal);
    for (let r = await it.next(); !r.done; r = await it.next()) chunks.push(r.value);
    await restarted;
    let off = 0;
    for (const ch of chunks.filter((x) => x.stream === "stdout")) {
      assert.equal(ch.offset, off, "no gap and no duplicate across the reconnect");
      off += Buffer.byteLength(ch.data);
    }
    const expected = Array.from({ length: n }, (_, i) => `tick${i + 1}\n`).join("");
    assert.equal(chunks.map((x) => x.data).join(""), expected);
    const result = await h.result;
    assert.equal(result.exit_code, 3);
    assert.equal(result.stdout, expected);

    const again = await c.getSandbox(sb.name);
    assert.deepEqual([again.id, again.status, again.dataplane_url], [sb.id, "ready", sb.dataplane_url]);
    assert.equal(text(await again.read("/home/user/before-restart.txt")), "kept");
    assert.equal((await again.run("echo after")).stdout, "after\n");
    await c.deleteSandbox(sb.name);
    failed = false;
  });
}
