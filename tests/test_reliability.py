"""Hostile inputs (tests/bad_inputs.py) through the library and the CLI, and artifact integrity.

Every refused input must raise its typed `espmed.errors` exception naming the file, and make the
CLI exit non-zero with one `error:`/`failed` line, no traceback and no output file. Valid-but-odd
inputs must be segmented. The outcomes table is written to `<pytest basetemp>/reliability_outcomes.md`
(and to `$ESPMED_RELIABILITY_TABLE` when set).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from espmed.errors import EspmedError

from .bad_inputs import CORPUS, HERE_TRT, SAMPLE_PNG, Case, Context, copy_artifact
from .runtime_artifacts import build_artifacts, write_manifest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def espmed(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from espmed.cli import run; run()", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Context:
    """The shared tiny artifacts, plus an OpenVINO IR copy with its manifest."""
    from espmed.runtimes.openvino_ir import read_ir_metadata

    paths = build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")
    ir_dir = tmp_path_factory.mktemp("ir-with-manifest")
    xml = copy_artifact(paths["openvino"], ir_dir)
    import openvino as ov

    meta = read_ir_metadata(ov.Core().read_model(str(xml)), xml)
    write_manifest(xml, meta, [xml, xml.with_suffix(".bin")])
    return Context(checkpoint=paths["checkpoint"], onnx=paths["onnx"], openvino=xml)


@pytest.fixture(scope="module")
def segmenter(context):
    from espmed.runtimes import load

    return load(context.onnx)


@pytest.fixture(scope="module")
def image_cli(context, tmp_path_factory) -> dict[str, tuple]:
    """One `espmed predict` over all refused image inputs, one over all converted ones.

    Each file gets its own line in the summary; batching keeps the suite fast (one process start
    instead of one per file). {expect: (completed process, {entry name: path}, output folder)}.
    """
    root = tmp_path_factory.mktemp("image-corpus")
    runs = {}
    for expect in ("refused", "converted"):
        entries = [b for b in CORPUS if b.kind == "image" and b.expect == expect]
        paths = {}
        for i, entry in enumerate(entries):
            d = root / expect / f"{i:02d}"
            d.mkdir(parents=True)
            paths[entry.name] = entry.build(d, context).path
        out = root / f"out-{expect}"
        runs[expect] = (espmed("predict", *paths.values(), "--model", context.onnx, "--out", out), paths, out)
    return runs


#: Runs several CLI commands through the real entry point (`espmed.cli.run`) in one process, so
#: torch is imported once; each command's exit code, stdout and stderr are recorded apart.
CLI_DRIVER = """
import contextlib, io, json, sys, traceback
from espmed.cli import run
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["espmed", *argv]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 99
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def checkpoint_cli(context, tmp_path_factory) -> dict[str, tuple]:
    """`espmed info -c` and `espmed export -c` on every bad checkpoint.

    {entry name: (case, [info result, export result], export output folder)}.
    """
    import json
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("checkpoint-corpus")
    cases, commands = {}, []
    for i, entry in enumerate(b for b in CORPUS if b.kind == "checkpoint"):
        d = root / f"{i:02d}"
        d.mkdir()
        case = entry.build(d, context)
        out = d / "out"
        cases[entry.name] = (case, out)
        export = ["export", "-c", str(case.path), "-t", "onnx", "--simplify", "none", "-o", str(out / "model.onnx")]
        commands += [["info", "-c", str(case.path)], export]
    proc = subprocess.run(
        [sys.executable, "-c", CLI_DRIVER, json.dumps(commands)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    results = [SimpleNamespace(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    return {name: (case, results[2 * i : 2 * i + 2], out) for i, (name, (case, out)) in enumerate(cases.items())}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    rows: list[dict] = []
    yield rows
    table = outcomes_table(rows)
    targets = [tmp_path_factory.getbasetemp() / "reliability_outcomes.md"]
    if os.environ.get("ESPMED_RELIABILITY_TABLE"):
        targets.append(Path(os.environ["ESPMED_RELIABILITY_TABLE"]))
    for target in targets:
        target.write_text(table)


def outcomes_table(rows: list[dict]) -> str:
    refused = sum(r["outcome"] == "refused" for r in rows)
    lines = [
        f"{len(rows)} inputs: {refused} refused, {len(rows) - refused} converted\n",
        "| # | input | kind | outcome | library | CLI exit | message (library) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(sorted(rows, key=lambda r: r["index"]), 1):
        message = r["message"].replace("|", "\\|")
        message = message if len(message) <= 140 else message[:137] + "..."
        lines.append(f"| {i} | {r['name']} | {r['kind']} | {r['outcome']} | {r['library']} | {r['cli']} | {message} |")
    return "\n".join(lines) + "\n"


# -- library -------------------------------------------------------------------------------------
def run_library(entry, case: Case, ctx: Context, seg) -> str:
    """Exercise the input as library code would; returns a short description of the result."""
    from espmed.io import read_image
    from espmed.model import load_checkpoint
    from espmed.runtimes import load
    from espmed.runtimes.engine_header import EngineBuildInfo, check_compatible, read_metadata

    if entry.kind == "image":
        image = read_image(case.path)
        shapes = []
        for frame in image.frames:
            mask = seg.predict(frame).mask
            assert mask.shape == frame.shape[:2] and mask.dtype == bool
            shapes.append(mask.shape)
        return f"{len(shapes)} frame(s) {image.frames[0].dtype} {shapes[0][0]}x{shapes[0][1]} segmented"
    if entry.kind == "checkpoint":
        load_checkpoint(case.path)
        return "loaded"
    if entry.kind == "artifact":
        loaded = load(case.path, modality=case.modality)
        loaded.predict(np.asarray(__import__("PIL.Image").Image.open(SAMPLE_PNG)))
        return "loaded and ran"
    check_compatible(read_metadata(case.path), EngineBuildInfo(*HERE_TRT), str(case.path))
    return "compatible"


@pytest.mark.parametrize("entry", CORPUS, ids=[b.name for b in CORPUS])
def test_bad_input(entry, context, segmenter, outcomes, image_cli, checkpoint_cli, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    case = entry.build(d, context)
    row = {"index": CORPUS.index(entry), "name": entry.name, "kind": entry.kind, "outcome": entry.expect}

    # Library: the typed exception naming the file, or a valid conversion.
    if entry.expect == "refused":
        with pytest.raises(entry.error) as info:
            run_library(entry, case, context, segmenter)
        message = str(info.value)
        assert "\n" not in message.strip(), message
        assert case.path.stem in message, f"message does not name the file: {message}"  # or its .bin
        row["library"] = type(info.value).__name__
    else:
        message = run_library(entry, case, context, segmenter) + (f"; {entry.note}" if entry.note else "")
        row["library"] = "ok"
    row["message"] = message.replace(f"{case.path.parent}{os.sep}", "")  # the table shows file names
    if case.marker is not None:
        assert not case.marker.exists(), "the pickled payload ran"
        assert "weights_only" not in message  # no advice to turn the safe loader off

    # CLI: exit code, one error line, no traceback, no output file.
    row["cli"] = ", ".join(str(rc) for rc in run_cli(entry, case, context, image_cli, checkpoint_cli, tmp_path))
    outcomes.append(row)


def run_cli(entry, case: Case, ctx: Context, image_cli: dict, checkpoint_cli: dict, tmp_path: Path) -> list[int]:
    out = tmp_path / "out"
    if entry.kind == "image":
        proc, paths, out = image_cli[entry.expect]
        path, n = paths[entry.name], len(paths)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        if entry.expect == "refused":
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert f"0 segmented, {n} failed" in proc.stdout, proc.stdout
            failed = [line for line in proc.stdout.splitlines() if line.startswith("failed ") and str(path) in line]
            assert len(failed) == 1, proc.stdout
            assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
        else:
            assert proc.returncode == 0 and f"{n} segmented, 0 failed" in proc.stdout, proc.stdout + proc.stderr
            written = [f.name for f in out.iterdir()]
            assert any(name.startswith(path.name.split(".")[0]) for name in written), written
            assert not [name for name in written if name.startswith(".")], written
        return [proc.returncode]
    if entry.kind == "checkpoint":
        cli_case, procs, out = checkpoint_cli[entry.name]
        for proc in procs:
            check_cli_refusal(proc, cli_case.path.name, entry.error)
        assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
        if cli_case.marker is not None:
            assert not cli_case.marker.exists(), "the pickled payload ran under the CLI"
        return [proc.returncode for proc in procs]
    extra = ("--modality", case.modality) if case.modality else ()
    proc = espmed("predict", SAMPLE_PNG, "--model", case.path, "--out", out, *extra)
    check_cli_refusal(proc, case.path.stem, entry.cli_error or entry.error)
    assert not out.exists() or not list(out.iterdir())
    return [proc.returncode]


def check_cli_refusal(proc: subprocess.CompletedProcess, name: str, error: type[EspmedError]) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    if error is not None and error.__name__ != "BackendUnavailableError":
        assert name in errors[0], errors[0]


def test_corpus_is_large_and_covers_every_kind():
    assert len(CORPUS) >= 40
    assert {b.kind for b in CORPUS} == {"image", "checkpoint", "artifact", "engine"}
    assert sum(b.expect == "converted" for b in CORPUS) >= 6


def test_debug_flag_shows_the_traceback(context, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(context.checkpoint.read_bytes()[:1000])
    proc = espmed("--debug", "info", "-c", bad)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    plain = espmed("info", "-c", bad)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith("error:") and bad.name in plain.stderr


@pytest.mark.parametrize("entry", [b for b in CORPUS if "bomb" in b.tags], ids=lambda b: b.name)
def test_decompression_bomb_is_refused_without_allocating(entry, context, tmp_path):
    """Read the bomb in a fresh process: the peak RSS stays near the interpreter's own."""
    case = entry.build(tmp_path, context)
    code = (
        "import resource, sys\n"
        "from espmed.io import read_image\n"
        "from espmed.errors import ImageReadError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    read_image(sys.argv[1])\nexcept ImageReadError as exc:\n    print('refused', exc)\n"
        "print('peak_growth_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(case.path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "refused" in proc.stdout
    growth_kib = int(proc.stdout.split("peak_growth_kib")[1])
    assert growth_kib < 200 * 1024, f"reading the bomb grew the peak RSS by {growth_kib / 1024:.0f} MiB"


# -- artifact integrity --------------------------------------------------------------------------
@pytest.mark.parametrize("which,member", [("onnx", ".onnx"), ("openvino", ".xml"), ("openvino", ".bin")])
def test_every_artifact_member_is_hash_checked_and_no_verify_skips_it(which, member, context, tmp_path):
    from espmed.errors import ArtifactError
    from espmed.runtimes import load

    artifact = copy_artifact(getattr(context, which), tmp_path)
    target = artifact.with_suffix(member)
    data = bytearray(target.read_bytes())
    # Change a byte without breaking the file: a weight's low byte in .bin/.onnx, whitespace in .xml.
    if member == ".xml":
        data = bytearray(bytes(data).replace(b'version="', b'version ="', 1))
    else:
        data[len(data) - 64] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"SHA-256 .* does not match .*manifest\.json"):
        load(artifact)
    assert load(artifact, verify=False).predict(np.zeros((32, 32), np.uint8)).mask.shape == (32, 32)


def test_missing_member_and_manifest_metadata_mismatch(context, tmp_path):
    import json

    from espmed.errors import ArtifactError
    from espmed.runtimes import load

    xml = copy_artifact(context.openvino, tmp_path)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load(xml)
    onnx_copy = copy_artifact(context.onnx, tmp_path)
    manifest = onnx_copy.with_name(onnx_copy.name + ".manifest.json")
    data = json.loads(manifest.read_text())
    data["metadata"]["modality"] = "nuclei"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="manifest metadata differs"):
        load(onnx_copy)


def test_engine_header_tampering_is_caught_before_tensorrt(context, tmp_path):
    """The engine header (TensorRT version, GPU) is covered by the manifest hash and parsed safely."""
    from espmed.errors import ArtifactError
    from espmed.runtimes import load
    from espmed.runtimes.engine_header import MAGIC, read_engine

    from .bad_inputs import _engine

    case = _engine("ok.engine", *HERE_TRT)(tmp_path, context)
    meta, plan = read_engine(case.path)
    assert meta.extra["tensorrt_version"] == HERE_TRT[0] and plan
    data = case.path.read_bytes()
    case.path.write_bytes(data.replace(HERE_TRT[0].encode(), b"10.99.0.00", 1))  # a forged header
    with pytest.raises(ArtifactError, match=r"SHA-256 .* does not match .*manifest\.json"):
        load(case.path)
    huge = tmp_path / "huge_header.engine"
    huge.write_bytes(MAGIC + (1 << 62).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArtifactError, match="header length"):
        read_engine(huge)
