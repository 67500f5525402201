// Command execution over WebSocket `/execute/ws` (spec §3.3): `ws` is installed in this pass.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { makeSandbox, NO_RUN_CONFIG, recordFetches, sdk, sleep, uniqueName, LANGSMITH_VERSION } from "../harness/common.mjs";

let sb;
before(async () => { sb = await makeSandbox({ name: uniqueName("exec") }); });

const hasCloseInput = typeof sdk.CommandHandle.prototype.closeInput === "function";

test("ws is importable in this pass", async () => {
  const ws = await import("ws");
  assert.equal(typeof (ws.default ?? ws.WebSocket), "function");
});

test("run('echo hi') goes over WebSocket, not HTTP /execute", async () => {
  const rec = recordFetches();
  let r;
  try {
    r = await sb.run("echo hi");
  } finally {
    rec.restore();
  }
  assert.deepEqual([r.stdout, r.stderr, r.exit_code], ["hi\n", "", 0]);
  assert.ok(!rec.calls.some((c) => c.url.endsWith("/execute")), JSON.stringify(rec.calls));
});

test("stdout and stderr are separate", async () => {
  const r = await sb.run("echo out; echo err >&2; echo out2; echo err2 >&2");
  assert.equal(r.stdout, "out\nout2\n");
  assert.equal(r.stderr, "err\nerr2\n");
  assert.equal(r.exit_code, 0);
});

for (const [cmd, code] of [["exit 3", 3], ["false", 1], ["exit 255", 255], ["nosuchcommand-xyz", 127]]) {
  test(`non-zero exit: ${cmd} -> ${code}`, async () => {
    const r = await sb.run(cmd);
    assert.equal(r.exit_code, code);
    if (code === 127) assert.match(r.stderr, /nosuchcommand-xyz.*not found/);
  });
}

test("default shell, run user and working directory", async () => {
  assert.equal((await sb.run("whoami; pwd; echo $HOME")).stdout, "user\n/home/user\n/home/user\n");
  assert.notEqual((await sb.run("echo ${BASH_VERSION:-nobash}")).stdout, "nobash\n");
  assert.equal((await sb.run("echo ${BASH_VERSION:-nobash}", { shell: "/bin/sh" })).stdout, "nobash\n");
});

test("env and cwd", async () => {
  assert.equal((await sb.run('echo "$FOO-$BAR"', { env: { FOO: "a b", BAR: "c" } })).stdout, "a b-c\n");
  assert.equal((await sb.run("pwd", { cwd: "/tmp" })).stdout, "/tmp\n");
});

test("per-command runConfig", { skip: NO_RUN_CONFIG }, async () => {
  const r = await sb.run('pwd; echo "$X"', { runConfig: { work_dir: "/usr", env_vars: { X: "y" } } });
  assert.equal(r.stdout, "/usr\ny\n");
});

test("UTF-8 output", async () => {
  const t = "héllo wörld ✓ 日本語 🎉";
  assert.equal((await sb.run(`printf '%s\\n' '${t}'`)).stdout, `${t}\n`);
});

test("timeout -> LangSmithCommandTimeoutError", async () => {
  const t0 = Date.now();
  await assert.rejects(sb.run("echo started; sleep 30", { timeout: 2 }), (e) => {
    assert.ok(e instanceof sdk.LangSmithCommandTimeoutError, `${e?.name}: ${e?.message}`);
    assert.ok(e instanceof sdk.LangSmithSandboxOperationError);
    return true;
  });
  const elapsed = (Date.now() - t0) / 1000;
  assert.ok(elapsed >= 1.5 && elapsed < 15, `elapsed ${elapsed}s`);
});

test("timeout 0 means no limit", async () => {
  assert.equal((await sb.run("sleep 1; echo slept", { timeout: 0 })).stdout, "slept\n");
});

test("wait:false handle iteration", async () => {
  const h = await sb.run("for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 7", { wait: false });
  assert.ok(h instanceof sdk.CommandHandle);
  assert.equal(typeof h.commandId, "string");
  assert.match(h.commandId, /^[0-9a-f-]{32,36}$/);
  assert.ok(Number.isInteger(h.pid) && h.pid > 0, `pid ${h.pid}`);
  const chunks = [];
  for await (const c of h) chunks.push(c);
  assert.deepEqual(new Set(chunks.map((c) => c.stream)), new Set(["stdout", "stderr"]));
  for (const stream of ["stdout", "stderr"]) {
    let off = 0;
    for (const c of chunks.filter((c) => c.stream === stream)) {
      assert.equal(c.offset, off, `${stream} chunk offset`);
      off += Buffer.byteLength(c.data);
    }
  }
  assert.equal(chunks.filter((c) => c.stream === "stdout").map((c) => c.data).join(""), "out1\nout2\nout3\n");
  assert.equal(chunks.filter((c) => c.stream === "stderr").map((c) => c.data).join(""), "err1\nerr2\nerr3\n");
  const r = await h.result;
  assert.deepEqual([r.stdout, r.stderr, r.exit_code], ["out1\nout2\nout3\n", "err1\nerr2\nerr3\n", 7]);
  assert.equal(h.lastStdoutOffset, 15);
  assert.equal(h.lastStderrOffset, 15);
});

test("output is streamed while the command runs", async () => {
  const h = await sb.run("echo first; sleep 3; echo second", { wait: false });
  const t0 = Date.now();
  const it = h[Symbol.asyncIterator]();
  const first = await it.next();
  assert.match(first.value.data, /^first/);
  assert.ok(Date.now() - t0 < 2500, "first line must arrive before the command ends");
  assert.equal((await h.result).stdout, "first\nsecond\n");
});

test("callbacks", async () => {
  const out = [];
  const err = [];
  const r = await sb.run("for i in 1 2 3; do echo o$i; echo e$i >&2; done", {
    onStdout: (d) => out.push(d), onStderr: (d) => err.push(d),
  });
  assert.equal(out.join(""), "o1\no2\no3\n");
  assert.equal(err.join(""), "e1\ne2\ne3\n");
  assert.equal(r.stdout, "o1\no2\no3\n");
  assert.equal(r.exit_code, 0);
});

test("stdin: interactive input", async () => {
  const opts = { wait: false, timeout: 30 };
  if (hasCloseInput) opts.closeInput = false;
  const h = await sb.run('read a; echo "got:$a"; read b; echo "got:$b"', opts);
  const it = h[Symbol.asyncIterator]();
  h.sendInput("one\n");
  assert.equal((await it.next()).value.data, "got:one\n");
  h.sendInput("wörld\n");
  assert.equal((await it.next()).value.data, "got:wörld\n");
  assert.equal((await h.result).exit_code, 0);
});

test("stdin: closeInput sends EOF", { skip: !hasCloseInput && `langsmith ${LANGSMITH_VERSION} has no CommandHandle.closeInput()` }, async () => {
  const h = await sb.run("cat; echo done", { wait: false, closeInput: false, timeout: 30 });
  h.sendInput("hello\n");
  h.sendInput("wörld\n");
  h.closeInput();
  const r = await h.result;
  assert.equal(r.stdout, "hello\nwörld\ndone\n");
  assert.equal(r.exit_code, 0);
});

test("stdin is closed by default (cat sees EOF)", { skip: !hasCloseInput && `langsmith ${LANGSMITH_VERSION} never sends close_stdin (stdin stays open; spec §3.3.3)` }, async () => {
  const t0 = Date.now();
  const r = await sb.run("cat; echo eof", { timeout: 20 });
  assert.equal(r.stdout, "eof\n");
  assert.ok(Date.now() - t0 < 10_000);
});

test("kill", async () => {
  const marker = `/tmp/kill-${uniqueName()}`;
  const h = await sb.run(`echo started; sleep 300 & echo $! > ${marker}.pid; wait; touch ${marker}.done`, { wait: false, timeout: 120 });
  const it = h[Symbol.asyncIterator]();
  assert.equal((await it.next()).value.data, "started\n");
  const t0 = Date.now();
  h.kill();
  let r;
  try {
    r = await h.result;
  } catch (e) {
    assert.fail(`kill: the JS client waits for 'exit' after 'kill' (spec §3.3.6); got ${e?.name}: ${e?.message}`);
  }
  assert.notEqual(r.exit_code, 0);
  assert.ok(Date.now() - t0 < 10_000);
  await sleep(300);
  const check = await sb.run(`kill -0 $(cat ${marker}.pid) 2>/dev/null && echo alive || echo gone; ls ${marker}.done 2>&1`);
  assert.match(check.stdout, /^gone\n.*No such file/s, "kill must take the whole process group");
});

test("reconnect from offsets (handle.reconnect and sandbox.reconnect)", async () => {
  const h = await sb.run("echo one; sleep 1; echo two; sleep 1; echo three >&2; exit 5", { wait: false, timeout: 60 });
  const it = h[Symbol.asyncIterator]();
  assert.equal((await it.next()).value.data, "one\n");
  assert.equal(h.lastStdoutOffset, 4);
  // A second attachment resumes after what the first one saw.
  const h2 = await h.reconnect();
  const r2 = await h2.result;
  assert.equal(r2.stdout, "two\n");
  assert.equal(r2.stderr, "three\n");
  assert.equal(r2.exit_code, 5);
  // A finished command can be reattached from 0 by id (the session is kept for ttl_seconds).
  const h3 = await sb.reconnect(h.commandId, { stdoutOffset: 0, stderrOffset: 0 });
  const r3 = await h3.result;
  assert.deepEqual([r3.stdout, r3.stderr, r3.exit_code], ["one\ntwo\n", "three\n", 5]);
  const h4 = await sb.reconnect(h.commandId, { stdoutOffset: 2, stderrOffset: 6 });
  const r4 = await h4.result;
  assert.deepEqual([r4.stdout, r4.stderr, r4.exit_code], ["e\ntwo\n", "", 5]);
});

test("reconnect to an unknown command id -> LangSmithSandboxOperationError", async () => {
  await assert.rejects(async () => {
    const h = await sb.reconnect("no-such-command-id");
    await h.result;
  }, (e) => {
    assert.ok(e instanceof sdk.LangSmithSandboxOperationError, `${e?.name}: ${e?.message}`);
    return true;
  });
});

test("a client-supplied commandId is idempotent", async () => {
  const commandId = `cmd-${uniqueName()}`;
  const marker = `/tmp/${commandId}`;
  const h = await sb.run(`echo x >> ${marker}; cat ${marker} | wc -l`, { wait: false, commandId });
  assert.equal(h.commandId, commandId);
  assert.equal((await h.result).stdout.trim(), "1");
  // The same id attaches to the finished command instead of running it again.
  const again = await sb.run(`echo x >> ${marker}; cat ${marker} | wc -l`, { wait: false, commandId });
  assert.equal((await again.result).stdout.trim(), "1");
  assert.equal((await sb.run(`wc -l < ${marker}`)).stdout.trim(), "1");
});

test("concurrent commands", async () => {
  const n = 8;
  const t0 = Date.now();
  const results = await Promise.all(
    Array.from({ length: n }, (_, i) => sb.run(`sleep 1; echo job${i}; echo err${i} >&2; exit ${i}`)),
  );
  results.forEach((r, i) => {
    assert.deepEqual([r.stdout, r.stderr, r.exit_code], [`job${i}\n`, `err${i}\n`, i]);
  });
  assert.ok(Date.now() - t0 < 8000, `${n} concurrent 1 s commands took ${Date.now() - t0} ms`);
});

test("large output (2 MiB) arrives whole", async () => {
  const r = await sb.run("head -c 2097152 /dev/zero | tr '\\0' 'a'");
  assert.equal(r.stdout.length, 2097152);
  assert.ok(/^a+$/.test(r.stdout));
});
