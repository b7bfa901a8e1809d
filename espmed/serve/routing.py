"""Routing: which model segments a series, and where its results go.

The config file's `[[route]]` tables are tried in order; the first whose `match` fits the series'
first instance (its header only) wins, and a route without `match` takes any series. `match` keys:
Modality and BodyPartExamined (exact, case-insensitive), SeriesDescription (a regex, `re.search`)
and calling_ae, the AE title the series came from (recorded in the spool at C-STORE time, so a
restart routes the same way). The node's `model` is a last route without `match` (with no
`[[route]]`, the only one). Each distinct (model, modality) is loaded once, however many routes name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, EspmedError
from .destinations import parse_destination

ROUTE_KEYS = ("name", "model", "modality", "destinations", "match")
MATCH_KEYS = ("Modality", "BodyPartExamined", "SeriesDescription", "calling_ae")


@dataclass(frozen=True)
class Route:
    """One route: the series it takes (`match`, as written), its model and its destinations."""

    name: str
    model: str  # an artifact path (absolute) or a triton:// URL
    modality: str | None = None  # runtimes.load(modality=): a checkpoint's controller, an artifact's check
    destinations: list | None = None  # parsed; None: the node's
    match: dict[str, str] = field(default_factory=dict)
    description: re.Pattern | None = field(default=None, compare=False)  # match["SeriesDescription"], compiled

    def matches(self, header, calling_ae: str | None) -> bool:
        """Whether the series whose first instance's header is `header` takes this route."""
        for key, want in self.match.items():
            if key == "SeriesDescription":
                ok = self.description.search(_text(header, key)) is not None
            elif key == "calling_ae":
                ok = (calling_ae or "") == want
            else:
                ok = _text(header, key).casefold() == want.strip().casefold()
            if not ok:
                return False
        return True

    def where(self, node_destinations: list) -> list:
        """Where this route's results go: its own destinations, else the node's."""
        return node_destinations if self.destinations is None else self.destinations

    @property
    def label(self) -> str:
        """How logs and the status name the route: its name and model."""
        return f"{self.name} ({model_name(self.model)}{f', {self.modality}' if self.modality else ''})"

    def to_toml(self) -> dict:
        table: dict = {"name": self.name, "model": self.model}
        if self.modality:
            table["modality"] = self.modality
        if self.destinations is not None:
            table["destinations"] = [str(d) for d in self.destinations]
        if self.match:
            table["match"] = dict(self.match)
        return table


def model_name(model: str) -> str:
    """A model's short name: the artifact's file name, or a remote model's URL."""
    return model if "://" in model else Path(model).name


def resolve_model(text: str, base: Path | None) -> str:
    """A model as written: a URL stays; a path is made absolute, relative to `base` (the config
    file's folder) when given."""
    if "://" in text:
        return text
    path = Path(text).expanduser()
    return str(((base / path) if base is not None and not path.is_absolute() else path).resolve())


def parse_routes(tables, *, base: Path | None, where: str) -> list[Route]:
    """The `[[route]]` tables of a config file (`where` names it in errors)."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: route must be an array of tables ([[route]])")
    routes = [_parse_route(t, n, base=base, where=where) for n, t in enumerate(tables, 1)]
    names = [r.name for r in routes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: route names must differ: {', '.join(twice)}")
    return routes


def _parse_route(table: dict, n: int, *, base: Path | None, where: str) -> Route:
    here = f"{where}: [[route]] {n}"
    unknown = sorted(set(table) - set(ROUTE_KEYS))
    if unknown:
        raise ConfigError(f"{here}: unknown key {unknown[0]!r} (known: {', '.join(ROUTE_KEYS)})")
    for key in ("name", "model", "modality"):
        if key in table and not (isinstance(table[key], str) and table[key].strip()):
            raise ConfigError(f"{here}: {key} must be a non-empty string")
    if "model" not in table:
        raise ConfigError(f"{here}: model is required (an artifact, a checkpoint or triton://HOST:PORT/MODEL)")
    here = f"{where}: [[route]] {table.get('name', n)!r}" if "name" in table else here
    destinations = table.get("destinations")
    if destinations is not None:
        if not isinstance(destinations, list) or not all(isinstance(d, str) for d in destinations):
            raise ConfigError(f"{here}: destinations must be a list of strings")
        try:
            destinations = [parse_destination(d) for d in destinations]
        except EspmedError as exc:
            raise ConfigError(f"{here}: {exc}") from None
    match = table.get("match", {})
    if not isinstance(match, dict):
        raise ConfigError(f"{here}: match must be a table")
    unknown = sorted(set(match) - set(MATCH_KEYS))
    if unknown:
        raise ConfigError(f"{here}: unknown match key {unknown[0]!r} (known: {', '.join(MATCH_KEYS)})")
    for key, value in match.items():
        if not isinstance(value, str):
            raise ConfigError(f"{here}: match.{key} must be a string")
    description = None
    if "SeriesDescription" in match:
        try:
            description = re.compile(match["SeriesDescription"])
        except re.error as exc:
            raise ConfigError(f"{here}: match.SeriesDescription {match['SeriesDescription']!r} is not a valid "
                              f"regular expression ({exc})") from None
    return Route(name=table.get("name", f"route {n}"), model=resolve_model(table["model"], base),
                 modality=table.get("modality"), destinations=destinations, match=dict(match),
                 description=description)


def describe(header, calling_ae: str | None) -> str:
    """What routing saw of a series, for the line logged when no route takes it."""
    seen = ", ".join(f"{key} {_text(header, key)!r}" for key in MATCH_KEYS[:3])
    return f"{seen}, calling AE {calling_ae or ''!r}"


def read_header(path: Path):
    """The data set of an instance up to its pixel data (what routing looks at)."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _text(header, key: str) -> str:
    return str(header.get(key, "") or "").strip()


@dataclass(frozen=True)
class Routed:
    """A route with its loaded model and the hash output UIDs derive from (`pipeline.model_hash`)."""

    route: Route
    segmenter: object
    model_hash: str


class Router:
    """The node's routes in order, their models loaded, each distinct (model, modality) once."""

    def __init__(self, routes: list[Route], *, device: str, threads: int | None) -> None:
        from ..pipeline import model_hash
        from ..runtimes import load

        loaded: dict[tuple, tuple] = {}
        self.routes: list[Routed] = []
        for route in routes:
            key = (route.model, route.modality)
            if key not in loaded:
                segmenter = load(route.model, device=device, threads=threads, modality=route.modality)
                loaded[key] = (segmenter, model_hash(segmenter.source, segmenter.metadata))
            self.routes.append(Routed(route, *loaded[key]))
        self.models = len(loaded)

    def choose(self, header, calling_ae: str | None) -> Routed | None:
        """The first route the series takes; None when none does."""
        return next((r for r in self.routes if r.route.matches(header, calling_ae)), None)
