"""Test helper: Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) as a plain subprocess on loopback,
in its own folder with its own ports, and the few REST calls the tests make. Never the packaged
service; stopped at the end.

Over https (`Https`), Debian 12's Orthanc 1.10.1 needs a shim: its civetweb (libcivetweb1 1.15) is
built for the OpenSSL 1.1 API and dlopen()s "libssl.so" and "libcrypto.so" (the -dev symlinks), then
calls SSL_get_peer_certificate after every TLS handshake; OpenSSL 3 has that only as a macro for
SSL_get1_peer_certificate, so the looked-up pointer is NULL and the civetweb worker segfaults on the
first https request (with or without client certificates). `civetweb_tls_libraries` puts a
"libssl.so" that adds the missing symbol (and a "libcrypto.so") on Orthanc's LD_LIBRARY_PATH."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

from espmed.serve.sender import dicomweb_session

from .serve_node import HOST, free_port, wait_for

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING = (
    None if ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file() else
    f"Orthanc or its DICOMweb plugin not installed ({ORTHANC}, {DICOMWEB_PLUGIN}: apt-get install orthanc "
    "orthanc-dicomweb; tests/run.sh installs them where apt can reach its registry)"
)


def _linked(library: str) -> Path | None:
    """Where Orthanc's own copy of `library` (e.g. "libssl.so.3") is, from ldd."""
    try:
        out = subprocess.run(["ldd", str(ORTHANC)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(rf"^\s*{re.escape(library)}\S* => (\S+)", out, re.MULTILINE)
    return Path(found.group(1)) if found else None


def civetweb_tls_libraries(folder: Path) -> Path | str:
    """A folder with the "libssl.so" and "libcrypto.so" that Orthanc's civetweb dlopen()s (see the module
    docstring), for its LD_LIBRARY_PATH; or why there cannot be one here (a skip reason)."""
    ssl_lib, crypto_lib = _linked("libssl.so"), _linked("libcrypto.so")
    if ssl_lib is None or crypto_lib is None:
        return f"{ORTHANC} is not linked with OpenSSL (ldd): no https Orthanc"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "libcrypto.so").symlink_to(crypto_lib)
    if hasattr(ctypes.CDLL(str(ssl_lib)), "SSL_get_peer_certificate"):  # OpenSSL 1.1: nothing missing
        (folder / "libssl.so").symlink_to(ssl_lib)
        return folder
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return (f"no C compiler (cc) for the shim Orthanc's civetweb needs over https with {ssl_lib.name} "
                "(see tests/orthanc.py)")
    (folder / "shim.c").write_text(
        "typedef struct ssl_st SSL; typedef struct x509_st X509;\n"
        "X509 *SSL_get1_peer_certificate(const SSL *s);\n"
        "X509 *SSL_get_peer_certificate(const SSL *s) { return SSL_get1_peer_certificate(s); }\n")
    built = subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / "libssl.so"), str(folder / "shim.c"),
                            str(ssl_lib)], capture_output=True, text=True, timeout=120)
    if built.returncode:
        return f"cannot build the civetweb OpenSSL 3 shim: {built.stderr.strip()[-300:]}"
    return folder


@dataclass(frozen=True)
class Https:
    """Orthanc's HTTP server over TLS. certificate: its certificate then its key, in one PEM file;
    client_ca: the CA file its clients' certificates must chain to (SslVerifyPeers), None for no
    client certificates; users: HTTP basic authentication. ca, client (certificate, key), user: what
    this helper's own REST calls use."""

    certificate: Path
    ca: Path
    client_ca: Path | None = None
    client: tuple[Path, Path] | None = None
    users: tuple[tuple[str, str], ...] = ()
    libraries: Path | None = None  # civetweb_tls_libraries()

    def settings(self) -> dict:
        out = {"SslEnabled": True, "SslCertificate": str(self.certificate),
               "SslVerifyPeers": self.client_ca is not None,
               "AuthenticationEnabled": bool(self.users), "RegisteredUsers": dict(self.users)}
        if self.client_ca is not None:
            out["SslTrustedClientCertificates"] = str(self.client_ca)
        return out


class Orthanc:
    """One Orthanc in `folder`; the ports are chosen up front, so a node can be pointed at it before
    it listens. AE title ORTHANC; DICOMweb at `dicomweb`; over https with `https`."""

    def __init__(self, folder: Path, https: Https | None = None) -> None:
        self.folder = folder
        self.https = https
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"{'https' if https else 'http'}://{HOST}:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        # this helper's REST calls: the node's DICOMweb session (a stale kept-alive connection is retried)
        self.http = dicomweb_session(None)
        if https:
            self.http.verify = str(https.ca)
            self.http.cert = tuple(str(p) for p in https.client) if https.client else None
            self.http.auth = https.users[0] if https.users else None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "espmed-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {},
        }
        env = None
        if self.https:
            config.update(self.https.settings())
            if self.https.libraries is not None:
                env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
                    p for p in (str(self.https.libraries), os.environ.get("LD_LIBRARY_PATH")) if p)}
        (self.folder / "config.json").write_text(json.dumps(config, indent=1))
        self.log = self.folder / "orthanc.log"
        self.proc = subprocess.Popen([str(ORTHANC), str(self.folder / "config.json")], cwd=self.folder,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.proc.poll() is not None or self._up(), 60, "Orthanc to answer /system")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def _up(self) -> bool:
        try:
            return self.http.get(f"{self.url}/system", timeout=2).ok
        except requests.ConnectionError:
            return False

    def remove(self) -> None:
        """Kill it (its data is thrown away: a clean shutdown only costs seconds) and remove its folder."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.http.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- REST ----------------------------------------------------------------------------------------
    def get(self, path: str):
        response = self.http.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def upload(self, ds) -> str:
        """POST /instances: the instance's Orthanc ID."""
        from io import BytesIO

        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        response = self.http.post(f"{self.url}/instances", data=buffer.getvalue(), timeout=30)
        response.raise_for_status()
        return response.json()["ID"]

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        response = self.http.put(f"{self.url}/modalities/{name}", json={"AET": ae_title, "Host": HOST, "Port": port},
                                timeout=30)
        response.raise_for_status()

    def store_to(self, modality: str, ids: list[str]) -> dict:
        """Orthanc sends these instances to `modality` by C-STORE (its REST `/modalities/<m>/store`)."""
        response = self.http.post(f"{self.url}/modalities/{modality}/store", json=ids, timeout=120)
        response.raise_for_status()
        return response.json()

    def instances_of_class(self, sop_class: str) -> list[str]:
        """Orthanc IDs of the instances of one SOP class (all of them: a repeat store adds none)."""
        found = self.http.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query": {}, "Expand": True},
                              timeout=30)
        found.raise_for_status()
        out = []
        for item in found.json():
            tags = self.get(f"/instances/{item['ID']}/simplified-tags")
            if tags.get("SOPClassUID") == sop_class:
                out.append(item["ID"])
        return out

    def file(self, instance_id: str) -> bytes:
        response = self.http.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        response.raise_for_status()
        return response.content
