"""The one table of formats: what loader, exporter, CLI help and bench read from it, the folder row
(Triton repositories) and its triton:// URLs resolving, and runtimes never importing export."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from espmed.errors import ArtifactError, EspmedError
from espmed.runtimes.formats import FORMATS, KINDS, exportable, format_for_path, format_named
from espmed.runtimes.loader import locate

from .runtime_artifacts import build_artifacts

REPO = Path(__file__).resolve().parents[1]


def test_every_row_is_well_formed():
    names = [f.name for f in FORMATS]
    assert len(set(names)) == len(names) and len({f.label for f in FORMATS}) == len(names)
    for f in FORMATS:
        assert f.kind in KINDS and f.label and f.module
        if f.artifact_of is not None:  # a run-time variant runs another row's artifact
            base = format_named(f.artifact_of)
            assert base.exportable and base.backend == f.backend and not f.suffixes and f.runtime_precision
        elif f.kind in ("checkpoint", "file"):
            assert f.suffixes and all(s.startswith(".") and s == s.lower() for s in f.suffixes)
    assert [f.name for f in FORMATS if f.kind == "checkpoint"] == ["torch"]
    assert format_named("torch").suffixes == (".safetensors", ".pth", ".pt") and not format_named("torch").exportable
    bf16 = format_named("openvino-bf16")
    assert (bf16.artifact_of, bf16.export_target, bf16.runtime_precision) == ("openvino", "openvino", "bf16")
    assert not bf16.exportable
    with pytest.raises(EspmedError, match="unknown format 'tflite'"):
        format_named("tflite")


def test_the_exporter_reads_its_targets_from_the_table_and_builds_each_backend():
    from espmed.export import TARGETS
    from espmed.export.targets import _BUILDERS, _WRAPPERS

    assert list(TARGETS.values()) == exportable()
    assert {f.backend for f in exportable()} == set(_BUILDERS) | set(_WRAPPERS)
    assert not set(_BUILDERS) & set(_WRAPPERS)


def test_artifact_files_map_to_their_backend():
    assert format_for_path("a/model.onnx").backend == "onnxruntime"
    assert format_for_path("MODEL.XML").backend == "openvino"
    assert format_for_path("m.engine").backend == "tensorrt"
    assert format_for_path("ckpt.pth").kind == "checkpoint"
    expected = r"unknown artifact type '\.tflite'; expected one of \.safetensors, \.pth, \.pt, \.onnx, \.xml, \.engine$"
    with pytest.raises(ArtifactError, match=expected):
        format_for_path("model.tflite")


def test_cli_help_and_bench_rows_come_from_the_table():
    from typer.testing import CliRunner

    from espmed.benchmark import options
    from espmed.cli import app

    help_text = " ".join(CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "One of: " + ", ".join(f.name for f in exportable()) + "." in help_text
    rows = options.select_rows("all")
    assert rows == list(FORMATS)
    record = options.row_record(format_named("openvino-bf16"))
    assert record["label"] == "OpenVINO FP32 IR, BF16 runtime precision" and record["export_target"] == "openvino"


def test_every_export_option_of_the_table_is_an_export_flag():
    import typer

    from espmed.cli import app
    from espmed.runtimes.formats import RUNTIME_PRECISIONS, export_options

    command = typer.main.get_command(app).commands["export"]
    flags = {opt for param in command.params for opt in param.opts}
    assert {"--" + name.replace("_", "-") for name in export_options()} <= flags
    assert {f.runtime_precision for f in FORMATS if f.runtime_precision} == set(RUNTIME_PRECISIONS)


def test_the_triton_row_resolves_export_folders_and_urls(tmp_path):
    """The folder row (an export of Triton repositories, by its manifest) served as triton:// URLs."""
    triton = format_named("triton")
    assert (triton.kind, triton.scheme, triton.backend) == ("folder", "triton", "triton") and triton.exportable
    assert exportable()[-1] == triton
    repo = tmp_path / "repo"
    (repo / "python").mkdir(parents=True)
    (repo / triton.marker).write_text("{}")
    assert locate(repo) == (triton, repo)
    assert locate("triton://localhost:8001/espmed") == (triton, "triton://localhost:8001/espmed")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "m.onnx").write_bytes(b"x")
    assert locate(tmp_path / "plain") == (format_named("onnx"), tmp_path / "plain" / "m.onnx")
    with pytest.raises(ArtifactError, match="no such artifact"):
        locate("http://localhost/espmed")  # no row has that scheme: a path like any other


EXPORT_BLOCKER = """
import importlib.abc, sys
class _NoExport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "espmed.export" or name.startswith("espmed.export."):
            raise ImportError("espmed.export is blocked in this test")
sys.meta_path.insert(0, _NoExport())
"""


def test_runtimes_import_and_run_where_espmed_export_cannot_be_imported(tmp_path_factory, tmp_path):
    from espmed.runtimes.engine_header import pack
    from espmed.runtimes.loader import load

    artifacts = build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")
    meta = load(artifacts["onnx"]).metadata
    meta.target, meta.backend = "trt-fp16", "tensorrt"
    meta.extra = {"tensorrt_version": "0.0-none", "gpu_name": "none", "compute_capability": "0.0"}
    engine = tmp_path / "model.engine"
    engine.write_bytes(pack(meta, b"serialized-engine-bytes"))
    script = EXPORT_BLOCKER + textwrap.dedent(
        f"""
        import numpy as np
        from espmed.errors import ArtifactError, BackendUnavailableError
        from espmed.runtimes import load
        image = np.full((40, 60, 3), 128, np.uint8)
        assert load({str(artifacts["onnx"])!r}).predict(image).mask.shape == (40, 60)
        try:
            load({str(engine)!r})  # the TensorRT backend reads its engine header from runtimes
        except (BackendUnavailableError, ArtifactError):
            pass
        try:
            import espmed.export
        except ImportError:
            pass
        else:
            raise SystemExit("espmed.export import was not blocked")
        assert not any(m.startswith("espmed.export") for m in sys.modules), "espmed.export got imported"
        print("export-free ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "export-free ok" in proc.stdout


def _imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module a module of `package` with this source imports, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_no_runtimes_module_imports_espmed_export():
    def export_imports(source: str) -> list[str]:
        names = _imported_modules(source, "espmed.runtimes")
        return sorted(n for n in names if n == "espmed.export" or n.startswith("espmed.export."))

    assert export_imports("def f():\n    from ..export import targets") == ["espmed.export", "espmed.export.targets"]
    assert export_imports("import espmed.export.graph\nfrom .metadata import X") == ["espmed.export.graph"]
    modules = sorted((REPO / "runtimes").glob("*.py"))
    assert len(modules) > 5
    offenders = {p.name: export_imports(p.read_text(encoding="utf-8")) for p in modules}
    assert not any(offenders.values()), offenders
