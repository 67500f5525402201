// A `cordon serve` of the suite's own (used by run.mjs, and by tests that restart a server).
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, appendFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(HERE, "../../../..");
const LOG_TAIL_LINES = 200;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function cordonBin() {
  const explicit = process.env.CORDON_BIN;
  if (explicit) return isAbsolute(explicit) ? explicit : join(REPO, explicit);
  for (const c of ["target/debug/cordon", "target/release/cordon"]) {
    if (existsSync(join(REPO, c))) return join(REPO, c);
  }
  throw new Error("no cordon binary: build it (cargo build -p cordon) or set CORDON_BIN");
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

/** The environment for `cordon serve` and the tests: nothing may reach LangSmith's hosted
 * service or go through a proxy. */
export function cleanEnv() {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith("LANGSMITH_") && !k.startsWith("LANGCHAIN_")) env[k] = v;
  }
  env.LANGSMITH_TRACING = "false";
  env.NO_PROXY = env.no_proxy = "127.0.0.1,localhost";
  return env;
}

export class CordonServer {
  constructor() {
    this.binary = cordonBin();
    this.apiKey = `ck-${randomBytes(16).toString("hex")}`;
    this.otherApiKey = `ck-${randomBytes(16).toString("hex")}`;
    this.dataDir = mkdtempSync(join(tmpdir(), "cordon-clients-js-"));
    this.logPath = `${this.dataDir}.log`;
    this.proc = null;
    this.exit = null;
    this.startedIn = null;
  }

  get url() { return `http://127.0.0.1:${this.port}`; }
  get endpoint() { return `${this.url}/api`; }
  get argv() {
    return ["serve", "--listen", `127.0.0.1:${this.port}`, "--data-dir", this.dataDir,
      "--api-key", this.apiKey, "--api-key", this.otherApiKey];
  }
  alive() { return this.proc !== null && this.exit === null; }

  /** Starts it (on a new free port the first time, the same port after) and waits for /healthz. */
  async start(timeoutMs = Number(process.env.CORDON_START_TIMEOUT ?? "180") * 1000) {
    this.port ??= await freePort();
    const fd = openSync(this.logPath, "a");
    const began = Date.now();
    this.exit = null;
    const proc = spawn(this.binary, this.argv, {
      cwd: REPO, stdio: ["ignore", fd, fd], detached: true,
      env: { ...cleanEnv(), CORDON_LOG: process.env.CORDON_LOG ?? "info", NO_COLOR: "1" },
    });
    closeSync(fd);
    this.proc = proc;
    this.exited = new Promise((r) => proc.once("exit", (code, signal) => { this.exit = code ?? signal; r(); }));
    let last = "no attempt";
    while (Date.now() - began < timeoutMs) {
      if (this.exit !== null) {
        throw new Error(`\`${this.binary} ${this.argv.join(" ")}\` exited with ${this.exit} before /healthz answered\n${this.logTail()}`);
      }
      try {
        const r = await fetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(2000) });
        if (r.status === 200) { this.startedIn = (Date.now() - began) / 1000; return; }
        last = `status ${r.status}`;
      } catch (e) {
        last = String(e.cause?.code ?? e.message);
      }
      await sleep(100);
    }
    await this.stop();
    throw new Error(`cordon serve did not answer GET /healthz with 200 within ${timeoutMs / 1000}s (last: ${last})\n${this.logTail()}`);
  }

  /** SIGTERM (or `signal`), then SIGKILL after 15 s. Returns the exit code or signal name. */
  async stop(signal = "SIGTERM") {
    if (!this.alive()) return this.exit;
    this.proc.kill(signal);
    const t = setTimeout(() => this.proc.kill("SIGKILL"), 15_000);
    await this.exited;
    clearTimeout(t);
    return this.exit;
  }

  async restart(signal = "SIGTERM") {
    const code = await this.stop(signal);
    appendFileSync(this.logPath, `=== test harness: server stopped (${code}), restarting ===\n`);
    await this.start();
    return code;
  }

  logTail(lines = LOG_TAIL_LINES) {
    let text;
    try {
      text = readFileSync(this.logPath, "utf8").replace(/\x1b\[[0-9;]*m/g, "");
    } catch (e) {
      return `(no server log: ${e.message})`;
    }
    const tail = text.split("\n").slice(-lines);
    return `--- cordon serve log (${this.logPath}, last ${tail.length} lines) ---\n${tail.join("\n")}`;
  }

  /** Removes the data dir (and the log unless `keepLog`), unless CORDON_KEEP_DATA=1. */
  cleanup({ keepLog = false } = {}) {
    if (process.env.CORDON_KEEP_DATA === "1") return `kept data dir ${this.dataDir} and log ${this.logPath}`;
    rmSync(this.dataDir, { recursive: true, force: true });
    if (!keepLog) rmSync(this.logPath, { force: true });
    return null;
  }
}
