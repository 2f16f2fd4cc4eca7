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


# Near-duplicate plants (tests/test_dedup.py): sentences of their own, each with near-copies that change one
# character or word, or only punctuation and case.
DEDUP_ZH = [
    "今天早上我们在公园里跑步，看到很多老人在打太极拳，空气非常清新。",
    "这家餐厅的红烧肉做得特别好吃，每到周末门口都排着很长的队伍。",
    "图书馆新到了一批关于人工智能的书籍，同学们都争着借阅这些新书。",
    "他每天坚持写日记，已经连续写了整整十年，从来没有间断过一天。",
    "春节期间火车票非常紧张，很多人提前一个月就开始在网上抢票了。",
    "小明的妈妈是一名医生，她经常在医院值夜班，照顾生病的孩子们。",
]
DEDUP_EN = [
    "The committee reviewed the annual budget proposal and asked the finance team to explain every "
    "unexpected increase in travel spending before the final vote next month.",
    "Researchers observed that the migratory birds arrived nearly two weeks earlier than usual, which "
    "they attribute to the unusually warm spring across the northern plains.",
    "After the storm knocked out power across the valley, volunteers opened the school gym as a shelter "
    "and served hot meals to families who had lost their homes.",
    "The new library branch offers free coding classes for teenagers on weekday evenings and lends "
    "laptops to students who do not have a computer at home.",
    "Doctors recommend drinking plenty of water, sleeping at least seven hours, and walking for thirty "
    "minutes a day to lower the risk of heart disease in older adults.",
    "Our quarterly report shows that online orders grew faster than store sales, so we plan to hire more "
    "warehouse staff and extend delivery hours during the holidays.",
]


def near_copies(text: str) -> list[str]:
    """Two near-copies of a planted sentence: one unit changed near the middle; only punctuation and case."""
    if any("\u4e00" <= c <= "\u9fff" for c in text):
        mid = len(text) // 2
        one = text[:mid] + ("的" if text[mid] != "的" else "了") + text[mid + 1 :]
        return [one, text.replace("，", "。").replace("。", "！", 1)]
    words = text.split()
    mid = len(words) // 2
    one = " ".join([*words[:mid], "very", *words[mid + 1 :]])
    return [one, text.upper().replace(",", ";").replace(".", "!")]
