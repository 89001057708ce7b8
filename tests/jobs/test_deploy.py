"""deploy/: the generated nginx config passes ``nginx -t``, and nginx in front of two stand-in replicas (tiny HTTP
servers answering with their name) keeps a browser on one replica by cookie and passes the websocket upgrade."""

import http.client
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_jobs_local import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import nginx_conf  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")


def replica(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in self.headers.get("Connection", "").lower():
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.end_headers()
                self.wfile.flush()
                data = self.connection.recv(4)  # the tunnel: raw bytes both ways
                self.connection.sendall(data + f":{name}".encode())
                self.close_connection = True
                return
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def proxy(tmp_path):
    replicas = {"r1": replica("r1"), "r2": replica("r2")}
    port = free_port()
    conf = nginx_conf.write(tmp_path, port, [s.server_address[1] for s in replicas.values()])
    args = ["nginx", "-e", str(tmp_path / "err.log"), "-p", str(tmp_path), "-c", str(conf)]
    checked = subprocess.run(args + ["-t"], capture_output=True, text=True)
    assert checked.returncode == 0 and "test is successful" in checked.stderr, checked.stderr
    subprocess.run(args, check=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    subprocess.run(args + ["-s", "stop"])
    for s in replicas.values():
        s.shutdown()


def get(port: int, cookie: str | None = None) -> tuple[str, str | None]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
    r = c.getresponse()
    return r.read().decode(), r.getheader("Set-Cookie")


def test_a_browser_sticks_to_one_replica_and_new_browsers_spread(proxy):
    seen = set()
    for _ in range(16):
        name, set_cookie = get(proxy)
        seen.add(name)
        assert set_cookie and set_cookie.startswith("qcore_replica=") and "HttpOnly" in set_cookie
        cookie = set_cookie.split(";")[0]
        answers = [get(proxy, cookie) for _ in range(5)]
        assert {a[0] for a in answers} == {name}  # the same replica every time
        assert all(a[1] is None for a in answers)  # the cookie is set once
    assert seen == {"r1", "r2"}  # 16 new browsers from one address: not all on one replica


def test_the_websocket_upgrade_goes_through(proxy):
    s = socket.create_connection(("127.0.0.1", proxy), timeout=5)
    s.sendall(b"GET /_stcore/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1024)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(b"ping")
    echo = s.recv(64)
    assert echo in (b"ping:r1", b"ping:r2")
    s.close()
