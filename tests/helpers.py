"""Helpers shared by the tests."""

from __future__ import annotations

PLANTED_SECRET = "planted-Secret-4f1c9e"  # must never appear in anything a job writes or prints


def make_bucket(s3_options: dict, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_options["endpoint_url"],
        aws_access_key_id=s3_options["key"],
        aws_secret_access_key=s3_options["secret"],
        region_name="us-east-1",
    )
    if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=name)


def write_texts(folder, files=(14, 13, 13), repeat_every=3) -> dict[str, str]:
    """Local Parquet inputs with a `text` and a `source` column; returns {derived id: text}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fengshen_batch.tiny_model import SAMPLE_LINES

    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for f, n in enumerate(files):
        texts = [SAMPLE_LINES[(i + f) % len(SAMPLE_LINES)] * (1 + i % repeat_every) for i in range(n)]
        pq.write_table(pa.table({"text": texts, "source": [f"file{f}"] * n}), folder / f"part-{f}.parquet")
        rows.update({f"part-{f}.parquet:{i}": t for i, t in enumerate(texts)})
    return rows


def file_tree(root) -> dict[str, bytes]:
    """Every file under `root` and its bytes: what a refused job must leave exactly as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def model_actor_pids() -> list[int]:
    """PIDs of this machine's Ray Data model actors (Ray titles their processes with the class name)."""
    import os

    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"MapBatches(ModelActor)" in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class FaultyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that answers every `every`-th request with an S3
    error instead of forwarding it: by default 503 SlowDown (transient); 403 InvalidAccessKeyId with every=1
    stands for refused credentials. It stops with the test."""

    def __init__(self, upstream: str, every: int = 4, status: int = 503, code: str = "SlowDown"):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        proxy = self
        self.body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            "<Message>injected by the test proxy</Message></Error>"
        ).encode()
        self.injected = 0
        self.forwarded = 0
        self._count = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy._count += 1
                    fail = proxy._count % every == 0
                    proxy.injected += fail
                    proxy.forwarded += not fail
                if fail:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(proxy.body)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # HEAD answers carry the object's length, not the (empty) body's
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def screenshot(page, shot, profile, size: str = "1100,900"):
    """Open the HTML file `page` in headless Chromium (no network, a throwaway profile) and save a PNG of it
    to `shot`; the finished process, for its return code and stderr."""
    import subprocess

    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={shot}", f"--window-size={size}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
