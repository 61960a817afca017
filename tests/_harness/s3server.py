"""A real S3-compatible server on 127.0.0.1 for the tests: moto's standalone server.

MinIO is not installable from the package registries here; moto's server
speaks the same S3 REST API (ListObjectsV2, GetObject, PutObject,
DeleteObject, SigV4) over real HTTP.  It runs in the test process on a free
port; its buckets live in the process's memory, so :meth:`S3Server.stop`
then :meth:`S3Server.start` is "the server went away and came back", with
its objects.  Stopping closes the listening socket: a client is refused,
not left hanging.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

__all__ = ["S3Server"]


class S3Server:
    """moto's S3 server on ``127.0.0.1``; :attr:`env` points boto3 at it.

    The credentials are random per server, so a test can look for them in
    everything a build wrote or printed.
    """

    def __init__(self, tmp: Path, bucket: str = "maps") -> None:
        self.bucket = bucket
        self.port = 0
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self._tmp = tmp
        self._server: Any = None
        self.start()
        self.client().create_bucket(Bucket=bucket)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server (and no config file of the user's)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self._tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self._tmp / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        """Start (again, on the same port once it had one)."""
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        """Stop answering and close the socket (connections are refused)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()
            server._server.server_close()

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", ())]

    def read(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def close(self) -> None:
        self.stop()
