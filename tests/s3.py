"""S3 for the test suite: moto's standalone server, which speaks the S3 protocol over real HTTP."""

import contextlib
import logging
from collections.abc import Iterator

from tests.postgres import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Moto:
    """moto's server in this process; `stop` and `start` it again on the same port. Its buckets and
    objects live in this process's memory, so they outlast a restart."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line for every request
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        # `stop` leaves the socket listening, so connections would wait unanswered: close it, and the
        # bucket's address refuses connections as a stopped server's does.
        if self.server._server is not None:
            self.server._server.server_close()


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """Start moto's server on a free loopback port and yield its endpoint URL."""
    with moto_server() as server:
        yield server.endpoint


@contextlib.contextmanager
def moto_server() -> Iterator[Moto]:
    server = Moto()
    server.start()
    try:
        yield server
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
