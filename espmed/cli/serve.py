"""`espmed serve`: run the DICOM node (espmed.serve), check its config, or print its status.

The options are generated from `espmed.serve.config.ServeConfig`, the one definition of the
node's settings, with the field's default (shown in `--help`). Click says which flags were given on
the command line (`Context.get_parameter_source`); only those override the `--config` file.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer

from ..serve.config import default_of, flag_fields, flags_of, value_type


def _plain(text: str) -> str:
    """Help text shown as written: Typer's rich help would take [serve] for markup."""
    return text.replace("[", "\\[")


CONFIG = typer.Option(None, "--config", "-c", help=_plain(
    "Config file (TOML): a [serve] table with these options' names as keys (ae_title, ...), and [[route]] "
    "tables; flags given here override it."))
CHECK = typer.Option(False, "--check", help="Validate the configuration, print it as TOML (secrets masked) "
                     "and exit; no model is loaded.")
STATUS = typer.Option(False, "--status", help="Print the status of the node using --spool and exit.")


def _parameters() -> list[inspect.Parameter]:
    """The Click context, then one keyword-only parameter per ServeConfig field that has a flag, then
    --config/--check/--status."""
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for f in flag_fields():
        kind = value_type(f)
        default = default_of(f)
        option = typer.Option(default, *flags_of(f), help=_plain(f.metadata["help"]), min=f.metadata["min"],
                              max=f.metadata["max"], show_default=default not in (None, []))
        annotation = list[str] if kind is list else kind
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation | None if default is None else annotation))
    for name, option, annotation in (("config", CONFIG, Path | None), ("check", CHECK, bool),
                                     ("status", STATUS, bool)):
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def serve(ctx: typer.Context, *, config: Path | None, check: bool, status: bool, **flags) -> None:
    """Receive DICOM by C-STORE, route each complete series to a model, send a DICOM SEG to the destinations."""
    import logging

    from ..serve import run
    from ..serve.config import load, to_toml, validate
    from ..serve.status import read_status

    # Click's ParameterSource (Typer vendors Click privately): COMMANDLINE, DEFAULT, ...
    given = {name: value for name, value in flags.items()
             if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    node = load(config, given)
    if status:
        typer.echo(json.dumps(read_status(node.serve.spool), indent=1))
        return
    if check:
        for warning in validate(node):
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(to_toml(node), nl=False)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # pynetdicom's per-association notes and errors, highdicom's per-attribute notes, dicomweb-client's
    # per-request notes: the node logs one line per event itself.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    for name in ("highdicom", "dicomweb_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run(node)


serve.__signature__ = inspect.Signature(_parameters())


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
