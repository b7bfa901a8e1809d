"""`espmed serve --config`: one definition (ServeConfig) for the [serve] keys and the flags, flags over
the file over the defaults, `--check`'s validation and its TOML (secrets masked), the example config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from espmed.cli import app
from espmed.errors import ConfigError, EspmedError
from espmed.serve.config import (
    MASK,
    NodeConfig,
    ServeConfig,
    default_of,
    flag_fields,
    load,
    to_toml,
    tomllib,
    validate,
)
from espmed.serve.destinations import DicomWebDestination

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "node.example.toml"
#: Flags the tests, docs and scripts already use: generated from ServeConfig, they must stay.
FLAGS = ("--model", "-m", "--ae-title", "--port", "--host", "--destination", "-d", "--allow", "--spool",
         "--series-timeout", "--max-associations", "--handshake-seconds", "--max-negotiating",
         "--max-negotiating-per-address", "--tls-cert", "--tls-key", "--tls-ca", "--destination-ca",
         "--destination-cert", "--destination-key", "--max-instance-gib", "--max-series-gib", "--max-spool-gib",
         "--min-free-gib", "--send-tries", "--retry-seconds", "--keep-hours", "--device", "--threads", "--status")


def write(folder: Path, text: str, name: str = "node.toml") -> Path:
    (folder / "a.onnx").write_bytes(b"not loaded by --check")  # a model file: --check looks for it only
    path = folder / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def cli(*args: str):
    return CliRunner().invoke(app, ["serve", *args])


def test_flags_are_generated_from_serve_config():
    command = typer.main.get_command(app).commands["serve"]
    names = {o for p in command.params for o in p.opts}
    assert set(FLAGS) <= names
    assert not any(o.startswith("--dicomweb") for o in names)  # secrets and their files: the config file only
    by_name = {p.name: p for p in command.params}
    for f in flag_fields():
        param = by_name[f.name]
        assert param.help.replace("\\[", "[") == f.metadata["help"]
        assert param.default == default_of(f)  # shown in --help as it is
    assert by_name["port"].type.min == 1 and by_name["port"].type.max == 65535
    assert {f.name for f in dataclasses.fields(ServeConfig)} - {f.name for f in flag_fields()} == {
        "dicomweb_ca", "dicomweb_cert", "dicomweb_key", "dicomweb_username", "dicomweb_password", "dicomweb_token"}


def test_a_good_file_and_flags_over_it(tmp_path):
    path = write(tmp_path, """
[serve]
model = "a.onnx"
ae_title = "NODE1"
port = 11200
series_timeout = 3
spool = "spool"
destinations = ["PACS@10.0.0.5:104", "dicomweb+https://pacs.example.org/dicom-web"]
dicomweb_username = "espmed"
dicomweb_password = "s3cret"
unrouted_keep_hours = 0.5
""")
    node = load(path)
    s = node.serve
    assert (s.ae_title, s.port, s.series_timeout, s.unrouted_keep_hours) == ("NODE1", 11200, 3.0, 0.5)
    assert s.spool == tmp_path / "spool" and s.model == str(tmp_path / "a.onnx")  # relative to the file
    assert isinstance(s.destinations[1], DicomWebDestination) and s.host == "0.0.0.0"  # a default
    assert validate(node) == []
    over = load(path, {"port": 4242, "destinations": ["DEST@127.0.0.1:4000"]}).serve
    assert over.port == 4242 and [str(d) for d in over.destinations] == ["DEST@127.0.0.1:4000"]
    assert over.ae_title == "NODE1"
    result = cli("--config", str(path), "--port", "4343", "--check")
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.output)["serve"]
    assert printed["port"] == 4343 and printed["ae_title"] == "NODE1" and printed["series_timeout"] == 3.0


@pytest.mark.parametrize(("text", "message"), [
    ("[serve]\nae_tilte = 'X'", "[serve] has no key 'ae_tilte'; did you mean 'ae_title'?"),
    ("[serve]\nport = 'eleven'", "[serve] port: expected an integer, got str 'eleven'"),
    ("[serve]\nport = 70000", "[serve] port: 70000 is out of range (must be >= 1 and <= 65535)"),
    ("[serve]\nseries_timeout = 0.0", "[serve] series_timeout: 0.0 is out of range (must be >= 0.1)"),
    ("[serve]\nallow = 'SCANNER'", "[serve] allow: expected a list of strings, got str 'SCANNER'"),
    ("[serve]\ndestinations = ['nowhere']", "[serve] destinations: destination 'nowhere': expected"),
    ("[server]\nport = 1", "unknown table 'server'"),
    ("[serve\nport = 1", "invalid TOML"),
    ("[[route]]\nmodel = 'a.onnx'\nmatch = {Modality = 'CT', Manufacturer = 'X'}", "unknown match key 'Manufacturer'"),
    ("[[route]]\nmodel = 'a.onnx'\nmatch = {SeriesDescription = '(lung'}", "is not a valid regular expression"),
    ("[[route]]\nmodality = 'ct'", "[[route]] 1: model is required"),
])
def test_bad_files_give_one_error_naming_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    result = subprocess.run([sys.executable, "-c", "from espmed.cli import run; run()", "serve", "--config", str(path),
                             "--check"], capture_output=True, text=True) if "regular" in message else None
    if result is not None:  # as the CLI prints it: one line, no traceback
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize(("serve", "message"), [
    ("ae_title = 'BAD\\\\AET'", "ae_title: invalid AE title"),
    ("tls_cert = 'c.pem'", "tls_cert and tls_key go together"),
    ("destination_ca = 'ca.pem'", "need a tls:// destination"),
    ("dicomweb_token = 't'", "dicomweb_token need a dicomweb+http(s):// destination"),
    ("destinations = ['dicomweb+https://h/d']\ndicomweb_token = 't'\ndicomweb_username = 'u'\n"
     "dicomweb_password = 'p'", "give one"),
    ("destinations = ['dicomweb+https://h/d']\ndicomweb_username = 'u'", "go together"),
    ("model = 'missing.onnx'", "no such artifact file"),
])
def test_check_refuses_what_the_node_would(tmp_path, serve, message):
    path = write(tmp_path, f"[serve]\nmodel = 'a.onnx'\n{serve}\n".replace("model = 'a.onnx'\nmodel", "model"))
    with pytest.raises(EspmedError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        validate(load(path))


def test_no_model_and_no_route_is_an_error():
    with pytest.raises(EspmedError, match="no model"):
        validate(NodeConfig(ServeConfig(), []))


def test_check_prints_toml_that_loads_to_the_same_config_with_secrets_masked(tmp_path):
    path = write(tmp_path, """
[serve]
destinations = ["dicomweb+https://pacs.example.org/dicom-web"]
dicomweb_token = "t0ps3cret"
allow = ["CT_SCANNER"]

[[route]]
name = "ct"
model = "a.onnx"
match = {Modality = "CT", SeriesDescription = "(?i)lung"}

[[route]]
model = "a.onnx"
modality = "brain"
destinations = ["PACS@10.0.0.5:104"]
""")
    path.chmod(0o644)
    result = subprocess.run([sys.executable, "-c", "from espmed.cli import run; run()", "serve", "--config",
                             str(path), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "t0ps3cret" not in result.stdout + result.stderr and f'dicomweb_token = "{MASK}"' in result.stdout
    assert "readable by others (mode 0644): chmod 600" in result.stderr  # a secret in a readable file
    printed = tomllib.loads(result.stdout)
    assert [r["name"] for r in printed["route"]] == ["ct", "route 2"]
    assert printed["route"][1]["destinations"] == ["PACS@10.0.0.5:104"]
    again = write(tmp_path, result.stdout, "again.toml")
    assert to_toml(load(again)) == result.stdout  # the output is a config that gives itself back
    assert len(load(path).all_routes) == 2  # no [serve] model: no default route


def test_status_reads_the_spool_the_config_names(tmp_path):
    path = write(tmp_path, "[serve]\nspool = 'node-spool'\n")
    result = cli("--config", str(path), "--status")
    assert result.exit_code == 0 and '"state": "no status file"' in result.output


def test_the_example_config_checks(tmp_path):
    """docs/node.example.toml: two routes on the shipped checkpoint, C-STORE and DICOMweb destinations,
    TLS both ways. Its certificates are not on this machine: warnings, exit 0."""
    result = subprocess.run([sys.executable, "-c", "from espmed.cli import run; run()", "serve", "--config",
                             str(EXAMPLE), "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert [r["name"] for r in printed["route"]] == ["ct-lung", "mr-brain"]
    assert Path(printed["route"][0]["model"]).is_file() and printed["serve"]["dicomweb_token"] == MASK
    assert "dicomweb+https://pacs.example.org/dicom-web" in printed["serve"]["destinations"]
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())
    assert "tls_cert /etc/espmed/tls/node.pem: no such file here" in result.stderr


def test_python_3_10_reads_the_config_with_tomli():
    """On 3.10 (no tomllib) the module takes `tomli`, the same parser (pyproject pins it there)."""
    code = (  # a stand-in `tomli` made of the parser this Python has
        "import sys, types\n"
        "from espmed.serve.config import tomllib as real\n"
        "del sys.modules['espmed.serve.config'], sys.modules['espmed.serve']\n"
        "fake = types.ModuleType('tomli'); fake.loads = real.loads; fake.TOMLDecodeError = real.TOMLDecodeError\n"
        "sys.modules['tomli'] = fake; sys.version_info = (3, 10, 14, 'final', 0)\n"
        "from espmed.serve import config\n"
        f"assert config.tomllib is fake and config.load({str(EXAMPLE)!r}).routes\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "tomli==2.5.0; python_version < '3.11'" in (ROOT / "pyproject.toml").read_text()
