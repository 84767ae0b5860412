"""SDK benchmark: what a user of the `wrenn` SDK sees against a local server.

Starts its own `wrenn server` (as bench_api.py does), then prints:
- `Capsule(wait=True)` create -> running (the SDK polls GET: first after 0.1 s, backing off);
- `capsule.commands.run("true")` round trip (the SDK sends `/bin/sh -c true`);
- `capsule.files.write` + `read` of a small file;
- `capsule.pause()` and `capsule.resume(wait=True)`.
Every capsule it made is destroyed and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _stats import summary  # noqa: E402
from bench_api import ms_since, start_server, stop_server  # noqa: E402

from wrenn import Capsule  # noqa: E402


def main(args: argparse.Namespace) -> None:
    server = start_server()
    os.environ["WRENN_API_KEY"] = server.api_key
    os.environ["WRENN_BASE_URL"] = server.base_url
    capsules: list[Capsule] = []
    try:
        create_ms = []
        for _ in range(args.n):
            t = time.perf_counter()
            capsule = Capsule(wait=True)
            create_ms.append(ms_since(t))
            capsules.append(capsule)
        print(summary("Capsule(wait=True) -> running", create_ms))

        capsule = capsules[0]
        for other in capsules[1:]:
            other.destroy()
            other.close()
        del capsules[1:]

        for _ in range(5):
            capsule.commands.run("true")  # warm up
        run_ms = []
        for _ in range(args.m):
            t = time.perf_counter()
            result = capsule.commands.run("true")
            run_ms.append(ms_since(t))
            assert result.exit_code == 0
        print(summary('commands.run("true")', run_ms))

        files_ms = []
        for i in range(args.m // 2):
            t = time.perf_counter()
            capsule.files.write("/tmp/bench.txt", f"hello {i}")
            assert capsule.files.read("/tmp/bench.txt") == f"hello {i}"
            files_ms.append(ms_since(t))
        print(summary("files.write + files.read (small)", files_ms))

        pause_ms, resume_ms = [], []
        for _ in range(args.cycles):
            t = time.perf_counter()
            capsule.pause()
            pause_ms.append(ms_since(t))
            t = time.perf_counter()
            capsule.resume(wait=True)
            resume_ms.append(ms_since(t))
        print(summary("capsule.pause()", pause_ms))
        print(summary("capsule.resume(wait=True)", resume_ms))
    finally:
        ids = [c.id for c in capsules]
        for c in capsules:
            try:
                c.destroy()
            except Exception:  # noqa: BLE001 - cleanup goes on
                pass
            c.close()
        stop_server(server, ids)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=15, help="capsules to create")
    parser.add_argument("-m", type=int, default=50, help="commands.run round trips")
    parser.add_argument("--cycles", type=int, default=10, help="pause/resume cycles")
    main(parser.parse_args())
