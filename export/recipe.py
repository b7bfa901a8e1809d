"""The INT8 float-layer recipe: which blocks an INT8 export keeps in float, chosen offline.

`benchmarks/quantization/sensitivity.py` ranks the model's blocks by the Dice an INT8 model loses
with each one quantized against its share of run time, picks the cheapest float set that passes the
gate, and writes the result beside the checkpoint (`<checkpoint stem>.quantization.json`). `export`
reads it for the INT8 targets and its gate verifies it on the export's own held-out images; when it
does not pass there, the export falls back to the growing float levels of `quantize.FLOAT_LEVELS`.
A recipe names the checkpoint it was ranked on (sha256) and is refused for any other. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from espmed.atomic import write_text
from espmed.errors import ExportError

RECIPE_SUFFIX = ".quantization.json"
SCHEMA = "espmed.quantization-recipe/1"


@dataclass(kw_only=True)
class Recipe:
    checkpoint_sha256: str  # the checkpoint the ranking ran on
    float_blocks: dict[str, list[str]]  # backend ("openvino", "onnxruntime") -> regexes over node names
    smooth_quant_alpha: float | None = None  # NNCF SmoothQuant alpha for MatMul (None: NNCF's default)
    runtime_precision: str | None = None  # OpenVINO: the runtime precision the ranking chose for INT8
    ranking: dict[str, Any] = field(default_factory=dict)  # how it was chosen (table, calibration, gate)
    source: str = ""  # where it was read from
    schema: str = SCHEMA

    def float_layers(self, backend: str, node_names: list[str]) -> list[str]:
        """The names among `node_names` that this recipe keeps in float for `backend`."""
        patterns = self.float_blocks.get(backend, [])
        if not patterns:
            return []
        rx = re.compile("|".join(f"(?:{p})" for p in patterns))
        return sorted(n for n in node_names if rx.search(n))

    def describe(self) -> dict[str, Any]:
        """The recipe's entry in an artifact's metadata."""
        return {"source": self.source, "float_blocks": self.float_blocks,
                "smooth_quant_alpha": self.smooth_quant_alpha, "runtime_precision": self.runtime_precision}

    def write(self, path: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "source"}
        write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def recipe_beside(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name.split(".")[0] + RECIPE_SUFFIX)


def read_recipe(path: Path, checkpoint_sha256: str) -> Recipe:
    """The recipe at `path`; refused when unreadable or ranked on another checkpoint."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the quantization recipe ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ExportError(f"{path}: not an espmed quantization recipe (schema {SCHEMA})")
    try:
        recipe = Recipe(**{k: v for k, v in data.items() if k != "source"}, source=str(path))
        for patterns in recipe.float_blocks.values():
            for p in patterns:
                re.compile(p)
    except (TypeError, AttributeError, re.error) as exc:
        raise ExportError(f"{path}: malformed quantization recipe ({exc})") from None
    if checkpoint_sha256 and recipe.checkpoint_sha256 != checkpoint_sha256:
        raise ExportError(
            f"{path}: this recipe was ranked on checkpoint {recipe.checkpoint_sha256[:12]}…, not on "
            f"{checkpoint_sha256[:12]}…; rerun benchmarks/quantization/sensitivity.py or pass recipe='none'"
        )
    return recipe


def find_recipe(option: str | Path | None, checkpoint: Path | None, checkpoint_sha256: str) -> Recipe | None:
    """The recipe an INT8 export uses: `option` (a path, or "none"), else the one beside the checkpoint."""
    if option is not None and str(option).lower() == "none":
        return None
    if option is not None:
        return read_recipe(Path(option), checkpoint_sha256)
    if checkpoint is not None and recipe_beside(checkpoint).is_file():
        return read_recipe(recipe_beside(checkpoint), checkpoint_sha256)
    return None
