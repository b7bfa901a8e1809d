"""Test helper: Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) as a plain subprocess on loopback,
in its own folder with its own ports, and the few REST calls the tests make. Never the packaged
service; stopped at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import requests

from .serve_node import HOST, free_port, wait_for

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING = (
    None if ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file() else
    f"Orthanc or its DICOMweb plugin not installed ({ORTHANC}, {DICOMWEB_PLUGIN}: apt-get install orthanc "
    "orthanc-dicomweb; tests/run.sh installs them where apt can reach its registry)"
)


class Orthanc:
    """One Orthanc in `folder`; the ports are chosen up front, so a node can be pointed at it before
    it listens. AE title ORTHANC; DICOMweb at `dicomweb`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"http://{HOST}:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "espmed-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {},
        }
        (self.folder / "config.json").write_text(json.dumps(config, indent=1))
        self.log = self.folder / "orthanc.log"
        self.proc = subprocess.Popen([str(ORTHANC), str(self.folder / "config.json")], cwd=self.folder,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self._up(), 60, "Orthanc to answer /system")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", timeout=2).ok
        except requests.ConnectionError:
            return False

    def remove(self) -> None:
        """Kill it (its data is thrown away: a clean shutdown only costs seconds) and remove its folder."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- REST ----------------------------------------------------------------------------------------
    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def upload(self, ds) -> str:
        """POST /instances: the instance's Orthanc ID."""
        from io import BytesIO

        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        response = requests.post(f"{self.url}/instances", data=buffer.getvalue(), timeout=30)
        response.raise_for_status()
        return response.json()["ID"]

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        response = requests.put(f"{self.url}/modalities/{name}", json={"AET": ae_title, "Host": HOST, "Port": port},
                                timeout=30)
        response.raise_for_status()

    def store_to(self, modality: str, ids: list[str]) -> dict:
        """Orthanc sends these instances to `modality` by C-STORE (its REST `/modalities/<m>/store`)."""
        response = requests.post(f"{self.url}/modalities/{modality}/store", json=ids, timeout=120)
        response.raise_for_status()
        return response.json()

    def instances_of_class(self, sop_class: str) -> list[str]:
        """Orthanc IDs of the instances of one SOP class (all of them: a repeat store adds none)."""
        found = requests.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query": {}, "Expand": True},
                              timeout=30)
        found.raise_for_status()
        out = []
        for item in found.json():
            tags = self.get(f"/instances/{item['ID']}/simplified-tags")
            if tags.get("SOPClassUID") == sop_class:
                out.append(item["ID"])
        return out

    def file(self, instance_id: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        response.raise_for_status()
        return response.content
