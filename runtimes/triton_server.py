"""A local Triton Inference Server for an exported repository, from PyPI's `nvidia-pytriton` wheel.

The wheel (`pip install --no-deps nvidia-pytriton==0.7.0`; its own dependencies pin numpy < 2)
bundles `tritonserver` 2.51 with the Python backend only, so it serves the `python/` repository of
an export: on loopback, on free ports unless given. The Python backend's stub embeds this
interpreter (its libpython first on LD_LIBRARY_PATH) and finds espmed through
`ESPMED_SITE_PACKAGES` (this environment's site-packages), which the exported model.py reads.
Used by the tests, `espmed bench --targets triton` and `python -m espmed.runtimes.triton_server`.
Torch-free; for a GPU server use NVIDIA's Triton container instead (README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from importlib import metadata as importlib_metadata
from pathlib import Path

from espmed.errors import BackendUnavailableError, EspmedError

from .triton_repository import MANIFEST, PYTHON_REPOSITORY, verify_repository

WHEEL = "nvidia-pytriton"
INSTALL_HINT = f"pip install --no-deps {WHEEL}==0.7.0"
READY_TIMEOUT_S = 120.0


def _wheel_file(relative: str) -> Path | None:
    try:
        path = Path(importlib_metadata.distribution(WHEEL).locate_file(relative))
    except importlib_metadata.PackageNotFoundError:
        return None
    return path if path.exists() else None


def _stub_path() -> Path | None:
    return _wheel_file(f"pytriton/tritonserver/python_backend_stubs/{sys.version_info[0]}.{sys.version_info[1]}")


def missing() -> str | None:
    """Why no local server can start here, or None."""
    if _wheel_file("pytriton/tritonserver/bin/tritonserver") is None:
        return f"no tritonserver: {WHEEL} is not installed ({INSTALL_HINT})"
    if _stub_path() is None:
        return f"{WHEEL} has no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def served_repository(path: str | Path) -> Path:
    """The model repository to serve: an export folder's verified `python/`, or a repository as given."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        verify_repository(path)
        return path / PYTHON_REPOSITORY
    if not path.is_dir():
        raise EspmedError(f"{path}: no such model repository")
    return path


class LocalTritonServer:
    """One `tritonserver` process on fixed ports; `start()` again after `kill()` reuses them."""

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", grpc_port: int | None = None) -> None:
        reason = missing()
        if reason:
            raise BackendUnavailableError(reason)
        self.repository = served_repository(repository)
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port, self.metrics_port = free_port(host), free_port(host)
        self._work = Path(tempfile.mkdtemp(prefix="espmed-triton-"))
        self.log_path = self._work / "tritonserver.log"
        self._backends = self._work / "backends"
        shutil.copytree(_wheel_file("pytriton/tritonserver/backends"), self._backends)
        shutil.copy(_stub_path() / "triton_python_backend_stub", self._backends / "python")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """`triton://host:grpc_port` (append `/MODEL` to load a model)."""
        return f"triton://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def _command(self) -> list[str]:
        h = self.host
        return [
            str(_wheel_file("pytriton/tritonserver/bin/tritonserver")), "--model-repository", str(self.repository),
            "--backend-directory", str(self._backends), "--http-address", h, "--grpc-address", h,
            "--metrics-address", h, "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--exit-timeout-secs", "5",
            # A model that fails to load is reported by `models()` and to clients, not fatal to the others.
            "--exit-on-error", "false", "--strict-readiness", "false",
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(_wheel_file("nvidia_pytriton.libs"))]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and Path(libdir, sysconfig.get_config_var("LDLIBRARY") or "").is_file():
            libs.insert(0, libdir)  # the stub embeds this interpreter, not whichever libpython is first
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["ESPMED_SITE_PACKAGES"] = os.pathsep.join(site.getsitepackages())
        return env

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LocalTritonServer:
        """Start the process and wait until it serves (every model loaded, or failed: see `models()`)."""
        if self.process is not None and self.process.poll() is None:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it for its lifetime
        try:
            self.process = subprocess.Popen(
                self._command(), env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        ready = f"http://{self.host}:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise BackendUnavailableError(f"tritonserver exited with {code}: {self.last_error()}")
            try:
                with urllib.request.urlopen(ready, timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise BackendUnavailableError(f"tritonserver not ready after {timeout_s:.0f} s: {self.last_error()}")

    def models(self) -> list[dict]:
        """The repository index: one {name, version, state, reason} per model version."""
        request = urllib.request.Request(f"http://{self.host}:{self.http_port}/v2/repository/index", data=b"{}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def last_error(self) -> str:
        """The server log's last error line (or last line)."""
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
        return (errors or lines or ["empty log"])[-1][:400]

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s); the stubs go with its process group."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m espmed.runtimes.triton_server", description=__doc__.split("\n")[0])
    parser.add_argument("repository", help="an `espmed export --target triton` folder, or a model repository")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    args = parser.parse_args(argv)
    try:
        server = LocalTritonServer(args.repository, host=args.host, grpc_port=args.grpc_port).start()
    except EspmedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving {server.repository} (log {server.log_path}); Ctrl-C stops it")
    for m in server.models():
        print(f"  {server.url}/{m['name']}  {m.get('state', '?')} {m.get('reason', '')}".rstrip())
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
