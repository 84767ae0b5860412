"""Template builds: first build, a rebuild changing only the last step (step cache), and the code
runner's create -> first `run_code` result.

Starts its own `wrenn server` (temporary data directory unless --data-dir), then prints:
- first build: POST /v1/builds of a recipe whose first step installs a package with apt, until
  `success`;
- cached rebuild: the same recipe with only the last step changed (steps before it come from the
  step cache), and the ratio first / rebuild;
- code runner: the first create of `code-runner-beta` (which builds it on this data directory if it
  was never built), then, for --runs fresh capsules, create -> first `run_code("1 + 1")` result.
Every capsule it made is destroyed and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from _stats import summary  # noqa: E402
from bench_api import start_server, stop_server  # noqa: E402

RECIPE = [
    "RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends jq",
    "RUN python3 -c 'import json; print(json.dumps({\"step\": 2}))' > /opt/step2.json",
    "ENV BENCH=1",
    "RUN echo version-1 > /opt/last",
]


def build(http, name: str, recipe: list[str], timeout: float = 1800) -> tuple[float, dict]:
    t = time.perf_counter()
    resp = http.post("/v1/builds", json={"name": name, "recipe": recipe})
    resp.raise_for_status()
    bid = resp.json()["id"]
    deadline = time.monotonic() + timeout
    while True:
        b = http.get(f"/v1/builds/{bid}").json()
        if b["status"] in ("success", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"build {name} not done after {timeout}s")
        time.sleep(0.1)
    elapsed = time.perf_counter() - t
    if b["status"] != "success":
        raise SystemExit(f"build {name} {b['status']}: {b['error']}")
    return elapsed, b


def main(args: argparse.Namespace) -> None:
    server = start_server(args.data_dir)
    created: list[str] = []
    http = server.client()
    try:
        health = http.get("/health").json()
        print(f"accelerator: {health.get('accelerator')}; {health.get('vmm')}")
        first, b1 = build(http, "bench-first", RECIPE)
        print(f"first build ({len(RECIPE)} steps, apt-get install jq first): {first:.1f} s")
        rebuild, b2 = build(http, "bench-rebuild", RECIPE[:-1] + ["RUN echo version-2 > /opt/last"])
        print(f"cached rebuild (last step changed, {b2['cached_steps']} steps from the cache): {rebuild:.1f} s")
        print(f"first / cached rebuild: {first / rebuild:.1f}x")
        for name in ("bench-first", "bench-rebuild"):
            http.delete(f"/v1/snapshots/{name}")

        os.environ.update(WRENN_API_KEY=server.api_key, WRENN_BASE_URL=server.base_url,
                          WRENN_PROXY_DOMAIN=f"localhost:{server.port}")
        from wrenn.code_runner import Capsule

        t = time.perf_counter()
        cap = Capsule()
        created.append(cap.id)
        cap.wait_ready(timeout=1800)
        assert cap.run_code("1 + 1").text == "2"
        print(f"code runner, first capsule (builds code-runner-beta if this data dir has none): "
              f"{time.perf_counter() - t:.1f} s")
        cap.destroy()
        samples = []
        for _ in range(args.runs):
            t = time.perf_counter()
            cap = Capsule()
            created.append(cap.id)
            cap.wait_ready(timeout=120)
            result = cap.run_code("1 + 1")
            samples.append((time.perf_counter() - t) * 1000)
            assert result.text == "2", result
            cap.destroy()
        print(summary("code runner create -> first run_code result", samples))
    finally:
        http.close()
        stop_server(server, created, keep=args.data_dir is not None)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="code runner capsules to time (default 5)")
    ap.add_argument("--data-dir", type=Path, help="reuse this data directory (keeps code-runner-beta built)")
    main(ap.parse_args())
