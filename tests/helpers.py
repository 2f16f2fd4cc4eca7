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
