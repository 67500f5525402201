// Command execution without the optional `ws` package (run.mjs hides it: CORDON_JS_NO_WS=1):
// `sandbox.run()` with wait and no callbacks falls back to HTTP `POST {dataplane_url}/execute`
// (spec §3.2), which is what a user who did not install `ws` gets.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { makeSandbox, NO_RUN_CONFIG, recordFetches, sdk, uniqueName } from "../../harness/common.mjs";

let sb;
before(async () => { sb = await makeSandbox({ name: uniqueName("http") }); });

/** Runs `fn` and returns [its value, the POST /execute calls it made]. */
async function viaHttp(fn) {
  const rec = recordFetches();
  try {
    const value = await fn();
    return [value, rec.calls.filter((c) => c.method === "POST" && c.url === `${sb.dataplane_url}/execute`)];
  } finally {
    rec.restore();
  }
}

test("ws cannot be imported in this pass", async () => {
  assert.equal(process.env.CORDON_JS_NO_WS, "1");
  await assert.rejects(import("ws"), (e) => e.code === "ERR_MODULE_NOT_FOUND");
});

test("run('echo hi') goes over HTTP POST /execute", async () => {
  const [r, calls] = await viaHttp(() => sb.run("echo hi"));
  assert.deepEqual([r.stdout, r.stderr, r.exit_code], ["hi\n", "", 0]);
  assert.equal(calls.length, 1);
});

test("stderr and non-zero exit", async () => {
  const [r, calls] = await viaHttp(() => sb.run("echo out; echo err >&2; exit 3"));
  assert.deepEqual([r.stdout, r.stderr, r.exit_code], ["out\n", "err\n", 3]);
  assert.equal(calls.length, 1);
  assert.equal((await sb.run("nosuchcommand-xyz")).exit_code, 127);
  assert.equal((await sb.run("false")).exit_code, 1);
});

test("per-command runConfig over HTTP", { skip: NO_RUN_CONFIG }, async () => {
  assert.equal((await sb.run('pwd; echo "$X"', { runConfig: { work_dir: "/usr", env_vars: { X: "y" } } })).stdout, "/usr\ny\n");
});

test("env, cwd and shell", async () => {
  assert.equal((await sb.run('echo "$FOO"', { env: { FOO: "a b" } })).stdout, "a b\n");
  assert.equal((await sb.run("pwd", { cwd: "/tmp" })).stdout, "/tmp\n");
  assert.equal((await sb.run("whoami; pwd")).stdout, "user\n/home/user\n");
  assert.equal((await sb.run("echo ${BASH_VERSION:-nobash}", { shell: "/bin/sh" })).stdout, "nobash\n");
});

test("stdin is closed (no PTY): cat sees EOF", async () => {
  const t0 = Date.now();
  const r = await sb.run("cat; echo eof; test -t 0 || echo notty", { timeout: 20 });
  assert.equal(r.stdout, "eof\nnotty\n");
  assert.ok(Date.now() - t0 < 10_000);
});

test("timeout: the command is killed and run() answers (spec §3.2 rec.: exit 124)", async () => {
  const marker = `/tmp/${uniqueName("httptimeout")}`;
  const t0 = Date.now();
  const r = await sb.run(`echo started; sleep 300 & echo $! > ${marker}.pid; wait; touch ${marker}.done`, { timeout: 2 });
  const elapsed = (Date.now() - t0) / 1000;
  assert.ok(elapsed >= 1.5 && elapsed < 12, `elapsed ${elapsed}s`);
  assert.equal(r.exit_code, 124, JSON.stringify(r));
  assert.equal(r.stdout, "started\n");
  const check = await sb.run(`kill -0 $(cat ${marker}.pid) 2>/dev/null && echo alive || echo gone; ls ${marker}.done 2>&1`);
  assert.match(check.stdout, /^gone\n.*No such file/s);
});

test("concurrent HTTP commands", async () => {
  const t0 = Date.now();
  const results = await Promise.all(Array.from({ length: 6 }, (_, i) => sb.run(`sleep 1; echo job${i}; exit ${i}`)));
  results.forEach((r, i) => assert.deepEqual([r.stdout, r.exit_code], [`job${i}\n`, i]));
  assert.ok(Date.now() - t0 < 8000, `took ${Date.now() - t0} ms`);
});

test("large output over HTTP (1 MiB)", async () => {
  const r = await sb.run("head -c 1048576 /dev/zero | tr '\\0' 'b'");
  assert.equal(r.stdout.length, 1048576);
});

test("wait:false still needs ws (the client says so; no request is made)", async () => {
  const [, calls] = await viaHttp(() => assert.rejects(sb.run("echo x", { wait: false }), /requires the 'ws' package/));
  assert.equal(calls.length, 0);
});

test("files work without ws", async () => {
  await sb.write("/tmp/nows.txt", "no ws");
  assert.equal(new TextDecoder().decode(await sb.read("/tmp/nows.txt")), "no ws");
  assert.equal((await sb.run("cat /tmp/nows.txt")).stdout, "no ws");
});

test("HTTP /execute with a wrong key -> 401, generic LangSmithSandboxError (spec §1.6 C)", async () => {
  const bad = new sdk.SandboxClient({ apiKey: "ck-wrong" });
  const foreign = new sdk.Sandbox({ ...sb, name: sb.name, dataplane_url: sb.dataplane_url }, bad);
  const [, calls] = await viaHttp(() => assert.rejects(foreign.run("echo hi"),
    (e) => e instanceof sdk.LangSmithSandboxError && /X-Api-Key/i.test(e.message)));
  assert.equal(calls.length, 1);
  const r = await fetch(`${sb.dataplane_url}/execute`, {
    method: "POST", headers: { "X-Api-Key": "ck-wrong", "Content-Type": "application/json" },
    body: JSON.stringify({ command: "echo hi", timeout: 10, shell: "/bin/bash" }),
  });
  assert.equal(r.status, 401);
});
