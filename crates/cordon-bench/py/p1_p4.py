"""P1 and P4 through the official Python client, run by `cordon-bench` against its own server.

Usage: python p1_p4.py URL API_KEY P1_ROUNDS P4_ROUNDS
Prints one JSON object: {"p1_ms": [...], "p4_ms": [...]}, each a list of samples in ms.
- P1: `sb.run("true")` on a ready sandbox (the client opens a new WebSocket per run).
- P4: create (default snapshot, wait_for_ready) -> first `run("true")` -> delete, cold.
"""
import json
import sys
import time

from langsmith.sandbox import SandboxClient


def main() -> None:
    url, key, p1_rounds, p4_rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    out = {"p1_ms": [], "p4_ms": []}
    with SandboxClient(api_endpoint=f"{url}/api/v2/sandboxes", api_key=key, max_retries=0) as client:
        if p1_rounds:
            sb = client.create_sandbox()
            try:
                for _ in range(5):  # warm the client's connection pool and imports
                    sb.run("true")
                for _ in range(p1_rounds):
                    started = time.perf_counter()
                    result = sb.run("true")
                    out["p1_ms"].append((time.perf_counter() - started) * 1e3)
                    if result.exit_code != 0:
                        raise SystemExit(f"true exited {result.exit_code}")
            finally:
                client.delete_sandbox(sb.name)
        for _ in range(p4_rounds):
            started = time.perf_counter()
            sb = client.create_sandbox()
            try:
                result = sb.run("true")
            finally:
                client.delete_sandbox(sb.name)
            out["p4_ms"].append((time.perf_counter() - started) * 1e3)
            if result.exit_code != 0:
                raise SystemExit(f"true exited {result.exit_code}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
