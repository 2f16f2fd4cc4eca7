"""What committing a shard file costs on S3: our whole-file write to its final name against Hadoop's
`_temporary/` + rename (issue 14), on moto's S3 server over HTTP on 127.0.0.1.

On S3 a rename is a server-side copy of every byte plus a delete, so the `_temporary/` committer pays the
upload and then the copy before a shard is visible; we upload once to the final name (`storage.write_whole`:
one PUT, or one multipart upload completed only when the whole file is written). moto copies in memory, so
its copy is far cheaper than S3's (which runs at roughly 50-100 MB/s per object); the request counts are
what carries over.

    python benchmarks/bench_commit_s3.py --files 16 --mb 6
writes benchmarks/results/commit-s3-moto-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument(
        "--mb", type=float, default=6.0, help="size of each shard file (a 4,096-row shard: ~6 MB)"
    )
    args = ap.parse_args()

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from fengshen_batch.io.storage import write_whole

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
            Bucket="commit-bench"
        )
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing-secret", client_kwargs={"endpoint_url": endpoint}
        )
        payload = os.urandom(int(args.mb * 2**20))

        def whole(i: int) -> None:
            write_whole(fs, f"commit-bench/whole/data/part-{i:06d}.parquet", lambda f: f.write(payload))

        def temporary_then_rename(i: int) -> None:
            tmp = f"commit-bench/hadoop/_temporary/attempt-0/part-{i:06d}.parquet"
            with fs.open(tmp, "wb") as f:
                f.write(payload)
            fs.mv(tmp, f"commit-bench/hadoop/data/part-{i:06d}.parquet")  # copy + delete

        results = {}
        for name, fn in (
            ("whole_file_to_final_name", whole),
            ("temporary_then_rename", temporary_then_rename),
        ):
            fn(-1)  # warm the connection pool
            start = time.perf_counter()
            for i in range(args.files):
                fn(i)
            seconds = time.perf_counter() - start
            results[name] = {
                "seconds": round(seconds, 3),
                "ms_per_file": round(seconds / args.files * 1e3, 1),
            }
            print(name, results[name], flush=True)
        ratio = results["temporary_then_rename"]["seconds"] / results["whole_file_to_final_name"]["seconds"]
    finally:
        server.stop()
    out = ROOT / "benchmarks" / "results" / f"commit-s3-moto-{dt.date.today():%Y%m%d}.json"
    out.write_text(json.dumps({
        "benchmark": "commit_s3", "date": dt.date.today().isoformat(), "server": "moto ThreadedMotoServer, 127.0.0.1",
        "files": args.files, "mb_per_file": args.mb, "results": results,
        "rename_over_whole": round(ratio, 2),
        "requests_per_file": {"whole_file_to_final_name": "1 PUT (or multipart: create, parts, complete)",
                              "temporary_then_rename": "the same upload, then 1 COPY (multipart copy above 5 GB) and 1 DELETE"},
    }, indent=2) + "\n")  # fmt: skip
    print(f"temporary + rename / whole = {ratio:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
