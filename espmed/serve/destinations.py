"""Where a node's results go: a DICOM C-STORE peer, or a DICOMweb server (STOW-RS).

Written on the command line or in the config file as

    AET@HOST:PORT                      C-STORE
    tls://AET@HOST:PORT                C-STORE over TLS
    dicomweb+http://HOST:PORT/PATH     STOW-RS to http://HOST:PORT/PATH/studies
    dicomweb+https://HOST:PORT/PATH    the same over https

Credentials never go in the text (it is logged and shown in the status file): they are config-file
settings. Each destination has a `key`, its folder name in the spool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import EspmedError

_AET = re.compile(r"^[\x20-\x7e]{1,16}$")
FORMS = "AET@HOST:PORT, tls://AET@HOST:PORT, dicomweb+http://HOST:PORT/PATH or dicomweb+https://HOST:PORT/PATH"


def check_ae_title(title: str) -> str:
    """An AE title: 1-16 printable ASCII characters, not all spaces, no backslash."""
    if not _AET.match(title) or not title.strip() or "\\" in title:
        raise EspmedError(f"invalid AE title {title!r} (1-16 printable ASCII characters)")
    return title.strip()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination, written AET@HOST:PORT, or tls://AET@HOST:PORT for DICOM over TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        tls = text.lower().startswith("tls://")
        aet, at, address = text[len("tls://"):].partition("@") if tls else text.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EspmedError(
                f"destination {text!r}: expected AET@HOST:PORT or tls://AET@HOST:PORT, e.g. PACS@10.0.0.5:104"
            )
        return cls(check_ae_title(aet), host.strip("[]"), int(port), tls)

    @property
    def key(self) -> str:
        """The destination's folder name in the spool."""
        return _safe(f"{'tls-' if self.tls else ''}{self.ae_title}@{self.host}_{self.port}")

    def __str__(self) -> str:
        return f"{'tls://' if self.tls else ''}{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb server that takes STOW-RS at `<base>/studies`, written dicomweb+http(s)://HOST:PORT/PATH."""

    base: str  # http(s)://HOST[:PORT][/PATH], no trailing slash
    #: Not DICOM over TLS (`Destination.tls`): https is verified with the config's dicomweb_* settings.
    tls = False

    @classmethod
    def parse(cls, text: str) -> DicomWebDestination:
        url = text[len("dicomweb+"):] if text.lower().startswith("dicomweb+") else ""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise EspmedError(f"destination {text!r}: expected dicomweb+http://HOST:PORT/PATH or "
                              "dicomweb+https://HOST:PORT/PATH, e.g. dicomweb+https://pacs:8042/dicom-web")
        if parts.username is not None or parts.password is not None:
            raise EspmedError(f"destination {_without_userinfo(text)!r}: no credentials in the URL (it is logged); "
                              "put dicomweb_username/dicomweb_password or dicomweb_token in the config file")
        if parts.query or parts.fragment:
            raise EspmedError(f"destination {text!r}: no query or fragment in a DICOMweb base URL")
        if ":" in parts.hostname or port == 0:
            raise EspmedError(f"destination {text!r}: an IPv6 literal or port 0 cannot be used; give a host name "
                              "or IPv4 address and a port")
        netloc = f"{parts.hostname}:{port}" if port else parts.hostname
        return cls(f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}")

    @property
    def key(self) -> str:
        """The destination's folder name in the spool; the '+' never occurs in a C-STORE one's."""
        return f"dicomweb+{_safe(self.base.replace('://', '_', 1))}"

    def __str__(self) -> str:
        return f"dicomweb+{self.base}"


def _without_userinfo(text: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", text, count=1)


def parse_destination(text: str) -> Destination | DicomWebDestination:
    """A destination from its written form (see the module docstring)."""
    text = text.strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    kind = scheme.group(1).lower() if scheme else ""
    if kind in ("", "tls") and "@" in text:
        return Destination.parse(text)
    if kind in ("dicomweb+http", "dicomweb+https"):
        return DicomWebDestination.parse(text)
    raise EspmedError(f"destination {_without_userinfo(text)!r}: expected {FORMS}")
