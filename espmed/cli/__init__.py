"""The `espmed` command line: a thin Typer layer over library functions.

Any `EspmedError` (bad input, files or environment) is printed as one line on stderr with a
non-zero exit; `--debug` shows the traceback instead. Command modules import heavy libraries
inside their functions so `espmed --version` stays instant.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from . import bench, convert, export, info, predict, serve, train

app = typer.Typer(
    name="espmed",
    help="Export, run and benchmark ESP-MedSAM medical image segmentation on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"espmed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


for module in (info, convert, predict, serve, export, bench, train):
    module.register(app)


def run() -> None:
    """Console-script entry point: Typer handles usage errors; ours become one line + exit 2."""
    from ..errors import EspmedError

    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        if _state["debug"] or "--debug" in sys.argv:
            raise
        if isinstance(exc, EspmedError):
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
