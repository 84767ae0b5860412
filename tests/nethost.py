"""A test "internet" host: a network namespace the test makes, on an address the test chose, with
an HTTP server on port 80 and an HTTPS server (self-signed) on 443. Capsules reach it through the
host's routes like any public server; nothing leaves this machine.

GET / answers `hello <Host>` (HTTPS: `secure <SNI>`), GET /bytes/<n> sends n bytes, POST /sink
reads the body and answers its length (for throughput in both directions).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r'''
import http.server, socketserver, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _send(self, body, ctype="text/plain"):
        self.send_response(200); self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2]); self.send_response(200)
            self.send_header("Content-Length", str(n)); self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                self.wfile.write(chunk[:min(n, 65536)]); n -= 65536
            return
        sni = getattr(self.connection, "wrenn_sni", None)
        text = f"secure {sni}" if isinstance(self.connection, ssl.SSLSocket) else f"hello {self.headers.get('Host')}"
        self._send(text.encode())
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); left = n
        while left > 0:
            left -= len(self.rfile.read(min(left, 65536)))
        self._send(str(n).encode())
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; allow_reuse_address = True
plain = S(("0.0.0.0", 80), H)
tls = S(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
def on_sni(sock, name, _ctx): sock.wrenn_sni = name
ctx.sni_callback = on_sni
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
print("ready", flush=True)
plain.serve_forever()
'''


class TestHost:
    """`with TestHost("198.51.100.10") as host:` — torn down (namespace, veth, server) on exit."""

    __test__ = False  # not a pytest test class

    def __init__(self, address: str = "198.51.100.10"):
        self.address = address
        suffix = secrets.token_hex(3)
        self.netns = f"wtesthost-{suffix}"
        self.veth = f"wth{suffix}"
        self.gateway = address.rsplit(".", 1)[0] + ".1"
        self.proc: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="wrenn-testhost-")

    def __enter__(self) -> TestHost:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    def _start(self) -> None:
        self._run("ip", "netns", "add", self.netns)
        self._run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        self._run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.veth)
        self._run("ip", "link", "set", self.veth, "up")
        for cmd in (["addr", "add", f"{self.address}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", self.gateway]):
            self._run("ip", "-n", self.netns, *cmd)
        d = Path(self._tmp.name)
        self._run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=testhost",
                  "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"))
        (d / "server.py").write_text(SERVER)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, str(d / "server.py"), str(d / "cert.pem"),
             str(d / "key.pem")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        line = self.proc.stdout.readline() if self.proc.stdout else b""
        if b"ready" not in line:
            raise RuntimeError(f"test host server did not start: {line!r}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        self._tmp.cleanup()
        deadline = time.monotonic() + 5
        while Path("/run/netns", self.netns).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
