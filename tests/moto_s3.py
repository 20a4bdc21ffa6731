"""A real S3 API on loopback for the object-store tests: moto's server mode in a thread of the test process,
on 127.0.0.1 and a free port, reached by the store through the endpoint in its URI. Credentials come from the
environment, as on a cluster (set here to moto's dummy ones, for this process and the writers it spawns)."""

from __future__ import annotations

import os
import uuid

import boto3
import moto.server
import pytest

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A function making a fresh bucket's store URI: `s3("name")` -> s3://<bucket>/name?endpoint=http://…"""
    saved = {k: os.environ.get(k) for k in (*ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(ENV)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=ENV["AWS_REGION"])
    bucket = f"xpeft-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)

    def uri(name: str) -> str:
        return f"s3://{bucket}/{name}?endpoint={endpoint}"

    uri.client, uri.bucket = client, bucket
    yield uri
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` of the test bucket, by key."""
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])]
    return {k: s3.client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}
