"""A local Cloud Storage emulator for tests: `gcs_emulator` (one per test process) and `gcs_bucket`.

`gcs_bucket` yields "gs://<fresh bucket>" for one test. The session fixture starts
`gcp-storage-emulator` (in memory) on 127.0.0.1 in a subprocess of its own (its
single-threaded HTTP server must not share a GIL with the test) and puts `emulator_env(url)`
into os.environ, so that subprocesses (the CLI, launch/local.sh) inherit it:

- tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL=<url> and
  GOOGLE_AUTH_TOKEN_FOR_TESTING=<any string> (sent as a bearer token, so no credential
  lookup happens);
- gcsfs (etils epath, hence orbax's metadata and tpustack.paths): STORAGE_EMULATOR_HOST=<url>,
  FSSPEC_GCS_TOKEN=anon (fsspec's per-protocol config from the environment; without it
  gcsfs tries google.auth.default and the metadata server first), and
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs >= 2026.10 otherwise asks the storage
  control gRPC API for every bucket's layout and waits 60 s for an answer the emulator
  cannot give);
- google-cloud-storage (tensorboardX's gs:// writer): STORAGE_EMULATOR_HOST alone; the
  client then uses anonymous credentials and no project.

Where the emulator (gcp-storage-emulator 2026.7.19) differs from Cloud Storage, so what these
tests leave untested (checked by tests/test_gcs_paths.py::test_emulator_shortfalls):

- Generation preconditions (ifGenerationMatch / ifGenerationNotMatch, x-goog-if-generation-match)
  are ignored: a write that Cloud Storage rejects with 412 succeeds. Whatever relies on them
  (tensorstore's conditional writes, orbax's commit of a step by two hosts, tensorboardX's
  generation-matched re-upload of its event file) is tested for the single-writer path only.
- Range reads: `bytes=a-b` and `bytes=a-` are honoured (206 with only those bytes), but a
  suffix range (`bytes=-n`) is ignored and the whole object comes back with 200. tpustack's
  read_range sends only `bytes=a-b`.
- No authentication, IAM, retention, rate limits (429/503) or retries are exercised, and
  every request is served one at a time.
- Media downloads come without x-goog-generation / x-goog-metageneration headers, which
  tensorstore needs to rewrite an object it has read (orbax's OCDBT manifests); the emulator
  runs here with those headers added (`_serve`), so the generation numbers it hands out are
  exercised, but not Cloud Storage's own header handling.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest


def emulator_env(url: str) -> dict[str, str]:
    """The environment that points tensorstore, gcsfs and google-cloud-storage at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",  # gcsfs: skip probing for a GCE metadata server
        # curl (tensorstore), requests and urllib take a proxy from the environment: not for the emulator
        **{k: ",".join(filter(None, [os.environ.get(k), "127.0.0.1", "localhost"])) for k in ("NO_PROXY", "no_proxy")},
    }


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # before emulator_env is set


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(url + "/", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def start_emulator(cwd: str, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """(process, url) of an in-memory emulator on a free 127.0.0.1 port; its log is cwd/emulator.log.

    The log is a file, never a pipe: nobody reads a pipe once the emulator is up, and a full
    one blocks the emulator's only thread, hanging every client (a run of failed requests'
    tracebacks is enough)."""
    log = os.path.join(cwd, "emulator.log")
    for _ in range(attempts):
        port = _free_port()  # another process may take it before the emulator binds: retry
        url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "start", "--host", "127.0.0.1",
                 "--port", str(port), "--in-memory", "--quiet"],
                cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if _healthy(url):
                return proc, url
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    with open(log, "rb") as err:
        raise RuntimeError(f"gcp-storage-emulator did not start: {err.read().decode(errors='replace')[-2000:]}")


def create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=10) as r:
        assert r.status == 200, r.read()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """The emulator's URL; os.environ points every GCS client at it until the session ends."""
    proc, url = start_emulator(str(tmp_path_factory.mktemp("gcs")))
    env = emulator_env(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its FSSPEC_* variables at import
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_bucket(url: str) -> str:
    """"gs://<name>" of a new, empty bucket on the emulator at `url`."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    create_bucket(url, name)
    return f"gs://{name}"


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """"gs://<name>" of a new, empty bucket for this test."""
    return new_bucket(gcs_emulator)


def _serve(argv: list[str]) -> None:
    """The emulator's own `start`, with two changes:

    - media downloads carry x-goog-generation and x-goog-metageneration, as Cloud Storage's
      do. tensorstore (orbax's arrays) takes an object's generation from those headers when it
      reads an OCDBT manifest and sends it back as the precondition of its next write of it;
      without them that write fails with "Malformed StorageGeneration" (every checkpoint of
      more than a few arrays reads and rewrites its manifest);
    - a client that hangs up before its answer (gcsfs races two requests per `info` and drops
      the loser) is not worth a traceback in the log.

    The handler table is built when the server module is imported, so the handler is replaced
    before that."""
    import socketserver

    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download_with_generation
    handle_error = socketserver.BaseServer.handle_error

    def quiet_hangups(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            handle_error(self, request, client_address)

    socketserver.BaseServer.handle_error = quiet_hangups
    from gcp_storage_emulator.__main__ import main

    main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
