// A `cordon serve` of the suite's own (used by run.mjs, and by tests that restart a server), and
// the test registries it is started with.
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, appendFileSync } from "node:fs";
import { createInterface } from "node:readline";
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

/** `cordon serve` flags for the test registries run.mjs started (CORDON_REGISTRIES), else none. */
export function registryServeArgs(info = registriesFromEnv()) {
  return info
    ? ["--insecure-registry", info.open, "--internal-registry", info.auth, "--registry-ca", info.ca_pem]
    : [];
}

/** The test registries' JSON line as run.mjs passed it on (CORDON_REGISTRIES), or null. */
export function registriesFromEnv() {
  return process.env.CORDON_REGISTRIES ? JSON.parse(process.env.CORDON_REGISTRIES) : null;
}

/** The registry helper (cordon-testkit's `test-registries` example), built with cargo when missing. */
export function registriesHelperBin() {
  const explicit = process.env.CORDON_TEST_REGISTRIES_BIN;
  if (explicit) return isAbsolute(explicit) ? explicit : join(REPO, explicit);
  for (const c of ["target/debug/examples/test-registries", "target/release/examples/test-registries"]) {
    if (existsSync(join(REPO, c))) return join(REPO, c);
  }
  const build = spawnSync("cargo", ["build", "-q", "-p", "cordon-testkit", "--example", "test-registries"], {
    cwd: REPO, encoding: "utf8",
  });
  const built = join(REPO, "target/debug/examples/test-registries");
  if (build.status !== 0 || !existsSync(built)) {
    throw new Error(`could not build the test-registries example (${build.status ?? build.error}):\n${(build.stderr ?? "").slice(-4000)}`);
  }
  return built;
}

/** The running `test-registries` helper: Debian's docker-registry on loopback, one open over plain
 * HTTP, one behind TLS from a test CA with htpasswd auth, test images pushed to both. It prints one
 * JSON line (`open`, `auth`, `ca_pem`, `username`, `password`, `images`) and runs until its stdin
 * reaches EOF, so it also stops when this process dies. */
export class Registries {
  constructor() {
    this.binary = registriesHelperBin();
    this.logPath = join(mkdtempSync(join(tmpdir(), "cordon-test-registries-")), "log");
    this.info = null;
    this.proc = null;
    this.exit = null;
  }

  async start(timeoutMs = Number(process.env.CORDON_REGISTRIES_TIMEOUT ?? "180") * 1000) {
    const fd = openSync(this.logPath, "a");
    const proc = spawn(this.binary, [], { cwd: REPO, stdio: ["pipe", "pipe", fd], detached: true });
    closeSync(fd);
    this.proc = proc;
    this.exited = new Promise((r) => proc.once("exit", (code, signal) => { this.exit = code ?? signal; r(); }));
    const lines = createInterface({ input: proc.stdout });
    const first = new Promise((res) => {
      lines.once("line", res);
      proc.once("exit", () => res(null));
    });
    let timer;
    const timeout = new Promise((res) => { timer = setTimeout(() => res(undefined), timeoutMs); });
    const line = await Promise.race([first, timeout]);
    clearTimeout(timer);
    // Anything after the JSON line goes to the log, so the pipe never fills.
    lines.on("line", (l) => appendFileSync(this.logPath, `${l}\n`));
    if (line === undefined || line === null) {
      await this.stop();
      throw new Error(`test-registries ${line === null ? `exited (${this.exit})` : `printed nothing within ${timeoutMs / 1000}s`}\n${this.logTail()}`);
    }
    try {
      this.info = JSON.parse(line);
      const missing = ["open", "auth", "ca_pem", "username", "password", "images"].filter((k) => !(k in this.info));
      if (missing.length) throw new Error(`missing keys ${missing.join(", ")}`);
    } catch (e) {
      await this.stop();
      throw new Error(`test-registries did not print its JSON line (${e.message}): ${line.slice(0, 2000)}\n${this.logTail()}`);
    }
  }

  /** Closes its stdin (its signal to stop), then SIGKILLs its process group after 30 s. */
  async stop() {
    if (this.proc === null || this.exit !== null) return this.exit;
    this.proc.stdin.end();
    const t = setTimeout(() => { try { process.kill(-this.proc.pid, "SIGKILL"); } catch { /* gone */ } }, 30_000);
    await this.exited;
    clearTimeout(t);
    return this.exit;
  }

  logTail(lines = 60) {
    let text;
    try {
      text = readFileSync(this.logPath, "utf8");
    } catch (e) {
      return `(no test-registries log: ${e.message})`;
    }
    const tail = text.split("\n").slice(-lines);
    return `--- test-registries log (${this.logPath}, last ${tail.length} lines) ---\n${tail.join("\n")}`;
  }

  cleanup() {
    if (process.env.CORDON_KEEP_DATA === "1") return `kept test-registries log ${this.logPath}`;
    rmSync(dirname(this.logPath), { recursive: true, force: true });
    return null;
  }
}

export class CordonServer {
  /** `extraArgs` default to the test registries' flags when run.mjs started them. */
  constructor({ extraArgs = registryServeArgs() } = {}) {
    this.binary = cordonBin();
    this.extraArgs = extraArgs;
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
      "--api-key", this.apiKey, "--api-key", this.otherApiKey, ...this.extraArgs];
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
