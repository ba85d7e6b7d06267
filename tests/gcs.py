"""A real GCS API for tests: `gcp-storage-emulator` on 127.0.0.1, a free port, in memory.

`emulator()` starts it as a subprocess and stops it on exit; `Bucket` uploads and inspects
objects with google-cloud-storage. The fixtures `gcs_emulator` (session) and `gcs_bucket`
(per test: a fresh bucket, `STORAGE_EMULATOR_HOST` and a private `EFCM_CACHE_DIR`) in
conftest.py are built from these, for the storage, DVC-remote and serving tests alike.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests import processes

HOST = "127.0.0.1"
PROJECT = "efcm-local"

# gcsfs stalls against an emulator without these (see PLATFORM.md); set before gcsfs is imported.
EMULATOR_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}


@dataclass(frozen=True)
class Emulator:
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        """The value for `STORAGE_EMULATOR_HOST`, gcsfs `endpoint_url` and DVC `endpointurl`."""
        return f"http://{HOST}:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b?project={PROJECT}", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def emulator(timeout: float = 30.0) -> Iterator[Emulator]:
    """Run `gcp-storage-emulator start --in-memory` on 127.0.0.1 until the block exits."""
    last = ""
    for _ in range(3):  # the free port can be taken between probing and binding: try another
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", HOST,
             "--port", str(port), "--in-memory", "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        emu = Emulator(port, proc)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline and not _ready(emu.url):
            time.sleep(0.05)
        if proc.poll() is None and _ready(emu.url):
            try:
                yield emu
            finally:
                _stop(proc)
            return
        _stop(proc)
        last = proc.stderr.read() if proc.stderr else ""
    raise RuntimeError(f"gcp-storage-emulator did not start on {HOST}: {last[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    processes.stop(proc, timeout=10)
    if proc.stderr:
        proc.stderr.close()


def client(emu: Emulator):
    """An anonymous google-cloud-storage client talking to `emu` (independent of the env)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emu.url},
    )


@dataclass
class Bucket:
    """A bucket on the emulator, with the upload helpers tests need."""

    emulator: Emulator
    name: str

    def __post_init__(self) -> None:
        self.client = client(self.emulator)
        self.bucket = self.client.bucket(self.name)

    def uri(self, name: str = "") -> str:
        return f"gs://{self.name}/{name}"

    def upload_file(self, path: str | Path, name: str) -> str:
        """Upload a local file as `name`; returns its gs:// URI."""
        self.bucket.blob(name).upload_from_filename(str(path))
        return self.uri(name)

    def upload_bytes(self, data: bytes, name: str) -> str:
        self.bucket.blob(name).upload_from_string(data)
        return self.uri(name)

    def upload_tree(self, folder: str | Path, prefix: str) -> list[str]:
        """Upload every file under `folder` as `prefix/<relative path>`; returns their URIs."""
        folder = Path(folder)
        return [
            self.upload_file(p, f"{prefix.rstrip('/')}/{p.relative_to(folder).as_posix()}")
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        ]

    def generation(self, name: str) -> int:
        blob = self.bucket.get_blob(name)
        if blob is None:
            raise FileNotFoundError(self.uri(name))
        return int(blob.generation)

    def delete(self, name: str) -> None:
        self.bucket.blob(name).delete()


def create_bucket(emu: Emulator, name: str) -> Bucket:
    client(emu).create_bucket(name)
    return Bucket(emu, name)


def use_emulator(monkeypatch, emu: Emulator, cache: Path) -> None:
    """Point efcm (google-cloud-storage, gcsfs, DVC subprocesses) at `emu`, with a private
    cache."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    monkeypatch.setenv("EFCM_CACHE_DIR", str(cache))
    for k, v in EMULATOR_ENV.items():
        monkeypatch.setenv(k, v)


@dataclass
class FlakyProxy:
    """An HTTP proxy in front of the emulator that answers 503 to the requests `fail` picks.

    Links in JSON answers (an object's mediaLink) are rewritten to the proxy, so downloads go
    through it too. `seen` lists every (method, path) it received.
    """

    target: str  # the emulator's url
    fail: Callable[[str, str], bool]
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextlib.contextmanager
def flaky_proxy(emu: Emulator, fail: Callable[[str, str], bool]) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(emu.url, fail)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            proxy.seen.append((self.command, self.path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if proxy.fail(self.command, self.path):
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            conn = http.client.HTTPConnection(HOST, emu.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if "json" in (resp.getheader("Content-Type") or ""):
                data = data.replace(emu.url.encode(), proxy.url.encode())
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, format, *args):  # quiet
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
