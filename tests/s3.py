"""S3 for the test suite: moto's standalone server, which speaks the S3 protocol over real HTTP."""

import contextlib
from collections.abc import Iterator

from tests.postgres import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """Start moto's server on a free loopback port and yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point any S3 client at the test server."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def create_bucket(endpoint: str, name: str, prefix: str = "images") -> str:
    """Create a bucket; returns the `QUBAX_STORAGE_URL` for a prefix inside it."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)
    return f"s3://{name}/{prefix}"
