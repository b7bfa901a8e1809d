"""The node's configuration, defined once: `ServeConfig`'s fields are the `[serve]` keys of the
`--config` TOML file, and `espmed serve`'s flags (names, help, bounds, defaults) are generated from
them, so the file, the flags and `--check`'s output cannot drift apart.

A value comes from the command line if the flag was given, else from the file, else the field's
default. Relative paths in the file are relative to the file's folder. The DICOMweb credentials and
certificates are file-only: a secret on the command line is visible to every user (`ps`).
"""

from __future__ import annotations

import difflib
import functools
import os
import stat
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError, EspmedError
from .destinations import Destination, DicomWebDestination, check_ae_title, parse_destination
from .routing import Route, parse_routes, resolve_model
from .sender import check_dicomweb_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

#: What `--check` prints instead of a secret.
MASK = "********"


def _field(default, help: str, *, flags: tuple[str, ...] | None = None, min: float | None = None,
           max: float | None = None, file_only: bool = False, secret: bool = False):
    """A ServeConfig field. flags: the CLI names (default `--field-name`); file_only: no flag."""
    cli = () if file_only else flags
    metadata = {"help": help, "flags": cli, "min": min, "max": max, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ServeConfig:
    """Every setting of `espmed serve` (the `[serve]` table, the flags)."""

    model: str | None = _field(
        None, "Artifact (.onnx, .xml, .engine), checkpoint or triton://HOST:PORT/MODEL: the default route, "
        "tried after any [[route]] of --config.", flags=("--model", "-m"))
    ae_title: str = _field("ESPMED", "This node's AE title (the called AE title senders use).")
    port: int = _field(11112, "TCP port to listen on (DICOM: 104 or 11112).", min=1, max=65535)
    host: str = _field("0.0.0.0", "Address to listen on.")
    destinations: list[Destination | DicomWebDestination] = _field(
        [], "Where results go: AET@HOST:PORT or tls://AET@HOST:PORT (C-STORE), dicomweb+https://HOST:PORT/PATH "
        "(STOW-RS) (repeatable). Without one, each SEG is kept in <spool>/results/<SeriesInstanceUID>/.",
        flags=("--destination", "-d"))
    allow: list[str] = _field([], "Calling AE titles allowed to connect (repeatable; default anyone).")
    spool: Path = _field(Path("espmed-spool"), "Spool folder: received instances, outbox, dead letters, status.")
    series_timeout: float = _field(10.0, "Seconds without a new instance after which a series is complete.",
                                   min=0.1)
    max_associations: int = _field(
        10, "Concurrent negotiated associations (connections still negotiating have their own caps).", min=1)
    handshake_seconds: float = _field(
        10.0, "A connection that has not negotiated an association by then is closed, whatever it sends.",
        min=0.5)
    max_negotiating: int = _field(16, "Connections negotiating at once, all peers.", min=1)
    max_negotiating_per_address: int = _field(
        8, "Connections negotiating at once from one peer address (a router may carry several scanners).",
        min=1)
    tls_cert: Path | None = _field(None, "Server certificate (PEM): accept TLS only.")
    tls_key: Path | None = _field(None, "Private key of --tls-cert (PEM).")
    tls_ca: Path | None = _field(None, "CA bundle: require client certificates it signed.")
    destination_ca: Path | None = _field(
        None, "CA bundle (PEM) that tls:// destinations' certificates must chain to (default: the system's CAs; "
        "verification is always on).")
    destination_cert: Path | None = _field(None, "Client certificate (PEM) for tls:// destinations.")
    destination_key: Path | None = _field(None, "Private key of --destination-cert (PEM).")
    dicomweb_ca: Path | None = _field(
        None, "CA bundle (PEM) that dicomweb+https destinations must chain to (default: the system's CAs).",
        file_only=True)
    dicomweb_cert: Path | None = _field(None, "Client certificate (PEM) for DICOMweb destinations.", file_only=True)
    dicomweb_key: Path | None = _field(None, "Private key of dicomweb_cert (PEM).", file_only=True)
    dicomweb_username: str | None = _field(None, "HTTP basic authentication user for DICOMweb.", file_only=True)
    dicomweb_password: str | None = _field(None, "HTTP basic authentication password.", file_only=True,
                                           secret=True)
    dicomweb_token: str | None = _field(None, "Bearer token for DICOMweb (not with basic).", file_only=True,
                                        secret=True)
    max_instance_gib: float = _field(1.0, "Largest instance accepted, GiB.", min=0.0)
    max_series_gib: float = _field(4.0, "Largest series accepted, GiB.", min=0.0)
    max_spool_gib: float = _field(64.0, "Spool size limit, GiB.", min=0.0)
    min_free_gib: float = _field(2.0, "Disk space always left free, GiB.", min=0.0)
    send_tries: int = _field(10, "Attempts per result before it goes to the dead-letter folder.", min=1)
    retry_seconds: float = _field(2.0, "First retry delay; doubles per failure, at most 300 s.", min=0.05)
    keep_hours: float = _field(24.0, "How long segmented series stay in the spool (late instances reopen them).",
                               min=0.0)
    unrouted_keep_hours: float = _field(
        24.0, "How long the instances of a series no route took stay in the spool (a late instance routes it "
        "again).", min=0.0)
    device: str = _field("CPU", "CPU, GPU/CUDA, TensorRT (ONNX Runtime) or AUTO (OpenVINO).")
    threads: int | None = _field(None, "Backend intra-op threads.", min=1)


@dataclass(frozen=True)
class NodeConfig:
    """A node's settings and its `[[route]]` tables (as written; `routes` adds the default)."""

    serve: ServeConfig
    routes: list[Route]
    source: Path | None = None  # the config file

    @property
    def all_routes(self) -> list[Route]:
        """The routes tried in order: the [[route]] tables, then the node's model (no match)."""
        default = [Route(name="default", model=self.serve.model)] if self.serve.model else []
        return [*self.routes, *default]

    @property
    def all_destinations(self) -> list:
        """Every destination a result can go to (the node's and the routes'), each once."""
        found = {d.key: d for d in self.serve.destinations}
        for route in self.routes:
            found.update((d.key, d) for d in route.destinations or ())
        return list(found.values())


def flag_fields() -> list:
    """The ServeConfig fields that have a command-line flag, in order."""
    return [f for f in fields(ServeConfig) if f.metadata["flags"] != ()]


def flags_of(f) -> tuple[str, ...]:
    return f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def value_type(f) -> type:
    """The field's type without None: int, float, str, Path, or list."""
    kind = _hints()[f.name]
    if typing.get_origin(kind) is list:
        return list
    return next((a for a in typing.get_args(kind) if a is not type(None)), kind)


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(ServeConfig)


def load(path: Path | None, flags: dict | None = None) -> NodeConfig:
    """The configuration from the file at `path` (if any) with `flags` (the flags given, by field
    name) over it; types, ranges and destinations are checked here, the rest by `validate`."""
    flags = flags or {}
    raw: dict = {}
    routes: list[Route] = []
    base = None
    if path is not None:
        path = Path(path)
        base = path.resolve().parent
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
        unknown = sorted(set(document) - {"serve", "route"})
        if unknown:
            raise ConfigError(f"{path}: unknown table {unknown[0]!r} (a config has [serve] and [[route]] tables)")
        raw = document.get("serve", {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: serve must be a table ([serve])")
        names = [f.name for f in fields(ServeConfig)]
        for key in raw:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"{path}: [serve] has no key {key!r}{hint}")
        routes = parse_routes(document.get("route", []), base=base, where=str(path))
    values = {}
    for f in fields(ServeConfig):
        if f.name in flags:
            values[f.name] = _value(f, flags[f.name], where=flags_of(f)[0], base=None)
        elif f.name in raw:
            values[f.name] = _value(f, raw[f.name], where=f"{path}: [serve] {f.name}", base=base)
    return NodeConfig(ServeConfig(**values), routes, path)


def _value(f, value, *, where: str, base: Path | None):
    """A file or flag value as the field's type, within its bounds."""
    kind = value_type(f)
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {_shown(value)}")
        if f.name == "destinations":
            try:
                return [parse_destination(v) for v in value]
            except EspmedError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return list(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is Path and isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        return base / path if base is not None and not path.is_absolute() else path
    if f.name == "model" and isinstance(value, str):
        return resolve_model(value, base)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(kind)}, got {_shown(value)}")
    low, high = f.metadata["min"], f.metadata["max"]
    if low is not None and value < low or high is not None and value > high:
        bounds = " and ".join(b for b in (low is not None and f">= {low}", high is not None and f"<= {high}") if b)
        raise ConfigError(f"{where}: {value} is out of range (must be {bounds})")
    return value


def validate(config: NodeConfig) -> list[str]:
    """Check what goes across settings (pairs, AE titles, routes, models on disk); returns the
    warnings: files named but missing here (the node reads them at start), secrets readable by others."""
    s = config.serve
    for key, title in [("ae_title", s.ae_title), *(("allow", t) for t in s.allow)]:
        try:
            check_ae_title(title)
        except EspmedError as exc:
            raise EspmedError(f"{key}: {exc}") from None
    if not config.all_routes:
        raise EspmedError("no model: give --model, or [serve] model or [[route]] tables in --config (or --status)")
    _pair(s, "tls_cert", "tls_key")
    if s.tls_ca and not s.tls_cert:
        raise EspmedError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    _pair(s, "destination_cert", "destination_key")
    check_dicomweb_settings(s)
    destinations = config.all_destinations
    if (s.destination_ca or s.destination_cert or s.destination_key) and not any(d.tls for d in destinations):
        raise EspmedError("--destination-ca/--destination-cert/--destination-key need a tls:// destination")
    dicomweb = [f.name for f in fields(ServeConfig) if f.name.startswith("dicomweb_") and getattr(s, f.name)]
    if dicomweb and not any(isinstance(d, DicomWebDestination) for d in destinations):
        raise EspmedError(f"{', '.join(dicomweb)} need a dicomweb+http(s):// destination")
    for route in config.all_routes:
        _model_exists(route)
    warnings = [f"{f.name} {getattr(s, f.name)}: no such file here (the node reads it when it starts)"
                for f in fields(ServeConfig) if value_type(f) is Path and f.name != "spool"
                and getattr(s, f.name) is not None and not getattr(s, f.name).is_file()]
    if config.source is not None and (s.dicomweb_password or s.dicomweb_token):
        mode = stat.S_IMODE(os.stat(config.source).st_mode)
        if mode & 0o077:
            warnings.append(f"{config.source} holds a DICOMweb password or token and is readable by others "
                            f"(mode {mode:04o}): chmod 600 {config.source}")
    return warnings


def _pair(s: ServeConfig, first: str, second: str) -> None:
    if bool(getattr(s, first)) != bool(getattr(s, second)):
        raise EspmedError(f"{first} and {second} go together")


def _model_exists(route: Route) -> None:
    """The route's model is an artifact or checkpoint here (or remote); nothing is loaded."""
    from ..runtimes.loader import locate

    try:
        locate(route.model)
    except EspmedError as exc:
        raise EspmedError(f"route {route.name!r}: {exc}") from None


def to_toml(config: NodeConfig) -> str:
    """The effective configuration as a config file (paths absolute, secrets masked); loading it
    gives the same."""
    import tomli_w

    serve = {}
    for f in fields(ServeConfig):
        value = getattr(config.serve, f.name)
        if value is None:
            continue  # TOML has no null: an absent key is the default None
        if f.metadata["secret"]:
            value = MASK
        elif isinstance(value, list):
            value = [str(v) for v in value]
        elif isinstance(value, Path):
            value = str(value.absolute())  # as the node will use it, wherever the output is read
        serve[f.name] = value
    document = {"serve": serve}
    if config.routes:
        document["route"] = [r.to_toml() for r in config.routes]
    return tomli_w.dumps(document)


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}.get(kind, kind.__name__)


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
