"""Every `espmed ...` command the README and docs/ show parses against the real CLI, and the cheap
ones run.

Commands are the lines of ```bash blocks (segments joined by `&&` or `;` that start with `espmed`).
The pages' runnable commands run in reading order (the README, then docs/ in its index's order),
through bash as a reader would paste them, with their `python -c` lines (which make inputs) and
their ```python blocks, in one scratch folder that holds the repository's `espmed/`, `configs/` and
`benchmarks/`, so a later command can use an earlier one's output (docs/predict.md segments with the
artifact docs/quickstart.md exported). To keep them cheap, exports and benches run at `--imgsz 256` and
benches with `--runs 1 --warmup 0`; what is too long or needs hardware is parsed only, for the
reason `too_long` gives.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from espmed.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: Reading order: the README, the docs index and the pages in its order, then the rest.
INDEXED = [DOCS / name for name in re.findall(r"\]\(([\w-]+\.md)\)", (DOCS / "README.md").read_text(encoding="utf-8"))]
PAGES = [REPO / "README.md", DOCS / "README.md", *dict.fromkeys(INDEXED + sorted(DOCS.glob("*.md"))),
         REPO / "benchmarks" / "README.md"]
PAGES = list(dict.fromkeys(PAGES))
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`(espmed [^`]+)`")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_.:/]*|.*[<>].*")
CHEAP_IMGSZ = "256"


def split_commands(line: str) -> list[str]:
    """`line` split at `&&` and `;` outside quotes."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        c = line[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == ";" or line.startswith("&&", i):
            parts.append(current)
            current, i = "", i + (2 if c == "&" else 1)
            continue
        current += c
        i += 1
    return [*parts, current]


def steps(page: Path) -> list[tuple[str, str, list[str]]]:
    """The page's runnable steps in order: ("espmed", text, argv after `espmed`) for every espmed
    command of its bash blocks, ("bash", text, []) for its `python -c` lines (they make inputs), and
    ("python", code, []) for each python block."""
    found, lang, block = [], None, []
    for line in page.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            if lang == "python":
                found.append(("python", "\n".join(block), []))
            lang, block = (None, []) if lang is not None else (fence.group(1), [])
            continue
        if lang == "python":
            block.append(line)
        if lang not in ("bash", "sh", "shell"):
            continue
        if line.startswith(("python -c ", "python3 -c ")):
            found.append(("bash", line, []))
            continue
        for segment in split_commands(line):
            words = shlex.split(segment, comments=True)
            if words[:1] == ["espmed"]:
                found.append(("espmed", segment.split(" #")[0].strip(), words[1:]))
    return found


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(text, argv after `espmed`) of every espmed command in the page's bash blocks, in order, and
    of every inline `espmed ...` code span in its prose that has options and no placeholder (IMAGE,
    DIR, <name>, …)."""
    found = [(text, argv) for kind, text, argv in steps(page) if kind == "espmed"]
    prose = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for span in INLINE.findall(prose):
        words = shlex.split(span)
        options = any(w.startswith("-") for w in words)  # a command line, not a command's name
        if options and not any(PLACEHOLDER.fullmatch(w) or "…" in w for w in words):
            found.append((span, words[1:]))
    return found


def option(argv: list[str], name: str) -> str | None:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def parse(argv: list[str]) -> None:
    """Parse `espmed argv` as the CLI would, without running it; raises on a usage error."""
    group = typer.main.get_command(app)
    words = [w for w in argv if w not in ("--debug",)]
    if not words or words[0] in ("--version", "--help"):
        return
    name, *rest = words
    command = group.commands.get(name)
    if command is None:
        raise AssertionError(f"no such command: espmed {name}")
    try:
        command.make_context(name, rest)
    except typer.Exit:  # --help
        pass


def too_long(argv: list[str]) -> str | None:
    """Why this command is parsed but not run (None: it runs)."""
    name = argv[0] if argv else ""
    targets = option(argv, "--targets") or option(argv, "-t") or option(argv, "--target") or ""
    if name == "serve" and "--status" not in argv and "--help" not in argv:
        return "a daemon (tests/test_serve*.py run it)"
    if name in ("train", "distill") and option(argv, "--config") != "configs/tiny.toml":
        return "training for minutes to hours"
    if "trt" in targets:
        return "needs TensorRT and an NVIDIA GPU"
    if name == "bench" and targets in ("", "all"):
        return "every target: minutes (the README's main job, measured by hand)"
    if any(slow in targets for slow in ("int8", "triton")):
        return "calibration or a Triton server: minutes"
    return None


def cheap(text: str, argv: list[str]) -> str:
    """The command `text` at a small input size and few timed runs. A BF16 export keeps its size:
    its accuracy gate's verdict depends on it (BF16 at 256 px is further from FP32)."""
    settings = {"export": (("--imgsz", CHEAP_IMGSZ),),
                "bench": (("--imgsz", CHEAP_IMGSZ), ("--runs", "1"), ("--warmup", "0"))}
    if option(argv, "--runtime-precision") == "bf16":
        settings["export"] = ()
    for name, value in settings.get(argv[0], ()):
        if option(argv, name) is None:
            text += f" {name} {value}"
        else:
            text = re.sub(rf"{name}[ =]\S+", f"{name} {value}", text)
    return text


def test_the_pages_show_commands():
    counts = {str(page.relative_to(REPO)): len(commands(page)) for page in PAGES}
    assert counts["README.md"] >= 4, counts
    assert sum(counts.values()) >= 20, counts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_parses(page):
    for _, argv in commands(page):
        try:
            parse(argv)
        except Exception as exc:  # noqa: BLE001 - any parse failure names the command
            raise AssertionError(f"{page.name}: `espmed {shlex.join(argv)}` does not parse: {exc}") from None


def test_the_cheap_commands_run_in_reading_order(tmp_path):
    for folder in ("espmed", "configs", "benchmarks"):
        (tmp_path / folder).symlink_to(REPO / folder)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = []
    for page in PAGES:
        for kind, text, argv in steps(page):
            if kind == "espmed":
                if too_long(argv):
                    continue
                text = cheap(text, argv)
            command = [sys.executable, "-c", text] if kind == "python" else ["bash", "-c", text]
            proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            where = page.relative_to(REPO)
            assert proc.returncode == 0, f"{where}: `{text}` exited {proc.returncode}:\n" + (
                proc.stderr[-2000:] or proc.stdout[-2000:])
            assert "Traceback" not in proc.stderr, f"{where}: `{text}`:\n{proc.stderr[-2000:]}"
            ran.append(f"{where}: {text if kind != 'python' else 'python block'}")
    print(f"ran {len(ran)}:\n" + "\n".join(ran))
