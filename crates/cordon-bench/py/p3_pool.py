"""P3 beside P4, and a burst of creates against a pool, through the official Python client; run
by `cordon-bench` (section `p3`, `src/pool_metrics.rs`) against its own server.

Usage: python p3_pool.py URL API_KEY ROUNDS BURST POOL_SIZE
Prints one JSON object of samples in ms:
- p3_ms / p4_ms: create (default snapshot, wait_for_ready) -> first `run("true")` -> delete, from
  a warm pool (P3) and cold (P4: the same snapshot with other resources, which no pool serves),
  alternated round by round so both see the same machine; the pool refills between rounds
  (untimed).
- burst_pool_ms / burst_cold_ms: each create's latency in a burst of BURST concurrent creates,
  against a full pool of POOL_SIZE and cold; *_wall_ms: the whole burst.
- p3_served / burst_served: how many creates the pool's `claimed` counter saw.
"""
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from langsmith.sandbox import SandboxClient

MIB = 1 << 20
VCPUS, MEM_BYTES, COLD_MEM_BYTES = 1, 512 * MIB, 1024 * MIB


class Api:
    def __init__(self, url, key):
        self.base, self.key = f"{url}/api/v2/sandboxes", key

    def __call__(self, method, path, body=None, timeout=600):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "X-Api-Key": self.key, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None


def wait_ready(api, pool, n, timeout=600):
    deadline = time.monotonic() + timeout
    while (body := api("GET", f"/pools/{pool}"))["ready"] < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"pool {pool} did not refill to {n}: {body}")
        time.sleep(0.05)


def create_run_delete(client, snapshot_id, mem_bytes):
    started = time.perf_counter()
    sb = client.create_sandbox(snapshot_id=snapshot_id, vcpus=VCPUS, mem_bytes=mem_bytes, timeout=300)
    try:
        result = sb.run("true")
    finally:
        client.delete_sandbox(sb.name)
    if result.exit_code != 0:
        raise SystemExit(f"true exited {result.exit_code}")
    return (time.perf_counter() - started) * 1e3


def burst(client, snapshot_id, mem_bytes, n):
    def one(_):
        started = time.perf_counter()
        sb = client.create_sandbox(snapshot_id=snapshot_id, vcpus=VCPUS, mem_bytes=mem_bytes, timeout=600)
        return (time.perf_counter() - started) * 1e3, sb.name

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        done = list(ex.map(one, range(n)))
    wall = (time.perf_counter() - started) * 1e3
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda d: client.delete_sandbox(d[1]), done))
    return [d[0] for d in done], wall


def main():
    url, key = sys.argv[1], sys.argv[2]
    rounds, burst_n, pool_size = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    api = Api(url, key)
    out = {"p3_ms": [], "p4_ms": []}
    with SandboxClient(api_endpoint=f"{url}/api/v2/sandboxes", api_key=key, max_retries=0) as client:
        [snap] = [s for s in client.list_snapshots(name_contains="system/default") if s.name == "system/default"]
        api("POST", "/templates", {"name": "bench-p3", "image": snap.id,
                                   "resources": {"cpu": str(VCPUS), "memory": f"{MEM_BYTES // MIB}Mi"}})
        api("POST", "/pools", {"name": "bench-p3", "template_name": "bench-p3", "replicas": pool_size,
                               "wait_for_ready": True, "timeout": 600})
        try:
            create_run_delete(client, snap.id, COLD_MEM_BYTES)  # warm the client and imports
            claimed = api("GET", "/pools/bench-p3")["claimed"]
            for _ in range(rounds):
                wait_ready(api, "bench-p3", pool_size)
                out["p3_ms"].append(create_run_delete(client, snap.id, MEM_BYTES))
                out["p4_ms"].append(create_run_delete(client, snap.id, COLD_MEM_BYTES))
            out["p3_served"] = api("GET", "/pools/bench-p3")["claimed"] - claimed
            if burst_n:
                wait_ready(api, "bench-p3", pool_size)
                claimed = api("GET", "/pools/bench-p3")["claimed"]
                out["burst_pool_ms"], out["burst_pool_wall_ms"] = burst(client, snap.id, MEM_BYTES, burst_n)
                out["burst_served"] = api("GET", "/pools/bench-p3")["claimed"] - claimed
                out["burst_cold_ms"], out["burst_cold_wall_ms"] = burst(client, snap.id, COLD_MEM_BYTES, burst_n)
        finally:
            api("DELETE", "/pools/bench-p3")
            api("DELETE", "/templates/bench-p3")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
