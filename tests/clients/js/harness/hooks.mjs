// Module resolution hooks for the JS client suites (registered by harness/register.mjs).
//
// The pinned node_modules live under .cache/clients/js-<name>-<hash>/ (tests/clients/js/npm-env.sh),
// not beside the tests, so bare specifiers imported by the test files themselves (`langsmith/sandbox`,
// `deepagents`, `ws`) are resolved as if imported from that directory. Imports made inside
// node_modules resolve normally: the client is used unchanged.
//
// CORDON_JS_NO_WS=1 makes `ws` unimportable, for everyone, the way it is for a user who did not
// install the optional peer: langsmith then runs `sandbox.run()` over HTTP `POST /execute`.
import { pathToFileURL } from "node:url";

let modulesParent;
let noWs = false;

export async function initialize(data) {
  modulesParent = pathToFileURL(`${data.envDir}/package.json`).href;
  noWs = data.noWs;
}

const BARE = /^(?![./]|node:|file:|data:)/;

export async function resolve(specifier, context, nextResolve) {
  if (noWs && (specifier === "ws" || specifier.startsWith("ws/"))) {
    const err = new Error(`Cannot find package '${specifier}' (hidden by CORDON_JS_NO_WS=1)`);
    err.code = "ERR_MODULE_NOT_FOUND";
    throw err;
  }
  const parent = context.parentURL ?? "";
  if (BARE.test(specifier) && parent.startsWith("file:") && !parent.includes("/node_modules/")) {
    try {
      return await nextResolve(specifier, { ...context, parentURL: modulesParent });
    } catch (e) {
      if (e?.code !== "ERR_MODULE_NOT_FOUND") throw e;
    }
  }
  return nextResolve(specifier, context);
}
