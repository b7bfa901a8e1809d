"""Peak memory of segmenting one DICOM series: decoded a chunk at a time vs all at once.

    espmed export --target onnx --imgsz 256 --out runs/series-memory
    python benchmarks/series_memory.py --model runs/series-memory/esp-medsam-real_microscopy_onnx.onnx \
        [--slices 200 --size 512 --out benchmarks/results/series_memory]

Builds a series of `--slices` 16-bit CT slices of `--size`² (pydicom's CT_small resized and shifted
per slice, one SeriesInstanceUID, 5 mm apart), then segments it through `espmed.pipeline
.segment_series` in a fresh process per setting: `--chunk` slices at a time (what predict and serve
do) and the whole series at once, each with and without building its DICOM SEG (highdicom). The
peak RSS growth over the process after loading the model is the series' cost.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from espmed.atomic import write_text
from espmed.machine import cpu_info
from espmed.pipeline import CHUNK_FRAMES


def make_series(folder: Path, slices: int, size: int) -> list[Path]:
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = np.asarray(Image.fromarray(source.pixel_array.astype(np.int32)).resize((size, size), Image.BILINEAR))
    series_uid, study_uid = generate_uid(), generate_uid()
    x, y, z = (float(v) for v in source.ImagePositionPatient)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slices):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.ImagePositionPatient = i + 1, [x, y, z + 5.0 * i]
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [float(v) * 128 / size for v in source.PixelSpacing]
        ds.PixelData = np.roll(base, 3 * i, axis=1).astype(source.pixel_array.dtype).tobytes()
        paths.append(folder / f"slice_{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def worker(model: str, folder: Path, chunk: int, seg_out: bool, threads: int) -> dict:
    from espmed.pipeline import model_hash, segment_series
    from espmed.runtimes import load

    seg = load(model, threads=threads)
    seg.predict_batch([np.zeros((64, 64), np.uint8)])  # warm: the model's own memory is not the series'
    loaded_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    result = segment_series(seg, sorted(folder.glob("*.dcm")), model_hash=model_hash(model), chunk=chunk,
                            dicom_out=seg_out)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"chunk": chunk, "seg": seg_out, "result": result.result, "frames": result.frames,
            "outputs": len(result.outputs), "seconds": round(seconds, 2), "rss_after_load_mib": round(loaded_mib, 1),
            "rss_peak_mib": round(peak_mib, 1), "series_cost_mib": round(peak_mib - loaded_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="An exported artifact (or checkpoint).")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=CHUNK_FRAMES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/series_memory"))
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "CHUNK", "SEG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, chunk, seg_out = args.worker
        print(json.dumps(worker(args.model, Path(folder), int(chunk), seg_out == "seg", args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        make_series(folder, args.slices, args.size)
        rows = []
        for seg_out, chunk in ((False, args.chunk), (False, args.slices), (True, args.chunk), (True, args.slices)):
            cmd = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                   "--worker", str(folder), str(chunk), "seg" if seg_out else "masks"]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    record = {"slices": args.slices, "size": args.size, "model": Path(args.model).name, "threads": args.threads,
              "cpu": cpu_info().get("model", platform.processor()), "rows": rows}
    write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    lines = [f"{args.slices} slices of {args.size}² (16-bit CT), {record['model']}, {args.threads} threads, "
             f"{record['cpu']}", "",
             "| slices per chunk | SEG built | frames | outputs | s | RSS after load (MiB) | peak RSS (MiB) "
             "| series cost (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['chunk']} | {'yes' if r['seg'] else 'no'} | {r['frames']} | {r['outputs']} | {r['seconds']} | "
              f"{r['rss_after_load_mib']} | {r['rss_peak_mib']} | {r['series_cost_mib']} |" for r in rows]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
