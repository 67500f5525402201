// `node --import ./harness/register.mjs`: installs harness/hooks.mjs (see there), and, for
// CommonJS requires inside the client, hides `ws` too when CORDON_JS_NO_WS=1.
import { register } from "node:module";
import Module from "node:module";

const envDir = process.env.CORDON_JS_ENV;
if (!envDir) throw new Error("CORDON_JS_ENV (the npm-env.sh directory) is not set");
const noWs = process.env.CORDON_JS_NO_WS === "1";
register("./hooks.mjs", import.meta.url, { data: { envDir, noWs } });

if (noWs) {
  const orig = Module._resolveFilename;
  Module._resolveFilename = function (request, ...rest) {
    if (request === "ws" || request.startsWith("ws/")) {
      const err = new Error(`Cannot find module '${request}' (hidden by CORDON_JS_NO_WS=1)`);
      err.code = "MODULE_NOT_FOUND";
      throw err;
    }
    return orig.call(this, request, ...rest);
  };
}
