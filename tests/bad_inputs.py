"""The hostile-input corpus: every entry builds one bad (or valid-but-odd) file in a temp folder.

Nothing here is stored in git: each builder writes its file from a few bytes, a bundled sample or
pydicom's test data. `tests/test_reliability.py` runs every entry through the library and the CLI.

kind:
  image       read by `espmed.io.read_image`; CLI `espmed predict FILE --model <onnx>`.
  checkpoint  read by `load_checkpoint`; CLI `espmed info -c FILE` and `espmed export -c FILE`.
  artifact    loaded by `espmed.runtimes.load` (and run once); CLI `espmed predict IMG --model FILE`.
  engine      a TensorRT engine header checked against another machine's TensorRT/GPU.
expect:
  refused     a typed `espmed.errors` exception naming the file; CLI exit != 0, nothing written.
  converted   valid but odd: read and segmented, with the conversion the docs describe.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from espmed.errors import (
    ArtifactError,
    BackendUnavailableError,
    CheckpointError,
    EspmedError,
    ImageReadError,
    ModalityError,
)

SAMPLES = Path(__file__).resolve().parents[1] / "espmed" / "assets" / "samples"
SAMPLE_PNG = SAMPLES / "ct_small.png"
#: The machine a foreign engine is checked against (what `TensorRtSegmenter` reads from TensorRT/CUDA).
HERE_TRT = ("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
#: Written by the pickle payloads if they ever execute.
PAYLOAD_MARKER = "pwned.txt"


@dataclass
class Context:
    """What builders may copy from: a tiny checkpoint, its ONNX and OpenVINO IR (with manifests)."""

    checkpoint: Path
    onnx: Path
    openvino: Path


@dataclass
class Case:
    """A built input: the file, plus CLI/library extras (a modality to ask for)."""

    path: Path
    modality: str | None = None
    marker: Path | None = None  # must not exist after loading (pickle payloads)


@dataclass(frozen=True)
class BadInput:
    name: str
    kind: str
    expect: str
    error: type[EspmedError] | None
    build: Callable[[Path, Context], Case]
    note: str = ""
    cli_error: type[EspmedError] | None = None  # when the CLI stops earlier than the library check
    tags: tuple[str, ...] = field(default=())


# -- small file makers ---------------------------------------------------------------------------
def gradient(h: int = 48, w: int = 64, dtype=np.uint8) -> np.ndarray:
    """A smooth, non-constant test image of any dtype (rows x cols ramp)."""
    ramp = np.add.outer(np.arange(h), np.arange(w)).astype(np.float64)
    ramp = ramp / ramp.max()
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return (info.min + ramp * (float(info.max) - info.min)).astype(dtype)
    return ramp.astype(dtype)


def gradient_volume(h: int, w: int, depth: int, dtype) -> np.ndarray:
    """`gradient` repeated along a third axis: an (H, W, D) test volume."""
    return gradient(h, w, dtype)[:, :, None].repeat(depth, axis=2)


def pil_bytes(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    return pil_bytes(Image.fromarray(array, mode) if mode else Image.fromarray(array), "PNG")


def jpeg_bytes() -> bytes:
    from PIL import Image

    return pil_bytes(Image.open(SAMPLE_PNG).convert("RGB"), "JPEG", quality=90)


def tiff_bytes(array: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kw)
    return buf.getvalue()


def nifti_bytes(array: np.ndarray) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(array, np.eye(4)).to_bytes()


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    import zlib

    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png_declaring(width: int, height: int, bad_crc: bool = False) -> bytes:
    """A PNG whose header declares `width` x `height` 8-bit gray, with a tiny IDAT (a bomb's shape)."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr, 0xDEADBEEF if bad_crc else None)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + png_chunk(b"IEND", b"")
    )


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose tags declare `width` x `height` with 16 bytes of data."""
    entries = [  # (tag, type, count, value); type 3 SHORT, 4 LONG
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    return out + struct.pack("<I", 0) + b"\0" * 16


def ct_dataset():
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(d: Path, name: str, data: bytes) -> Case:
    path = d / name
    path.write_bytes(data)
    return Case(path)


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


# -- image builders --------------------------------------------------------------------------------
def _htj2k_dicom(d: Path, ctx: Context) -> Case:
    """CT slice re-labelled High-Throughput JPEG 2000 (no pydicom decoder plugin is installed here)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = ct_dataset()
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write(d, "htj2k.dcm", dicom_bytes(ds))


def _dicom_without_pixels(d: Path, ctx: Context) -> Case:
    ds = ct_dataset()
    del ds.PixelData
    return write(d, "no_pixels.dcm", dicom_bytes(ds))


def _dicom_bomb(d: Path, ctx: Context) -> Case:
    ds = ct_dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    return write(d, "bomb.dcm", dicom_bytes(ds))


def _dicom_zero_rows(d: Path, ctx: Context) -> Case:
    ds = ct_dataset()
    ds.Rows = 0
    return write(d, "zero_rows.dcm", dicom_bytes(ds))


def _dicom_truncated(d: Path, ctx: Context) -> Case:
    return write(d, "truncated.dcm", cut(dicom_bytes(ct_dataset()), 0.6))


def _nifti_bomb(d: Path, ctx: Context) -> Case:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 2000))
    header.set_data_dtype(np.float32)
    return write(d, "bomb.nii", bytes(header.binaryblock) + b"\0" * 4 + b"\0" * 4096)


def _nifti_zero(d: Path, ctx: Context) -> Case:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((32, 0, 8))
    header.set_data_dtype(np.float32)
    return write(d, "zero_size.nii", bytes(header.binaryblock) + b"\0" * 4)


def _nifti_with(value: float) -> Callable[[Path, Context], Case]:
    def build(d: Path, ctx: Context) -> Case:
        vol = gradient_volume(32, 32, 4, np.float32)
        vol[5, 7, 2] = value
        return write(d, f"float_{value}.nii.gz", gzip.compress(nifti_bytes(vol)))

    return build


def _tiff_with(value: float) -> Callable[[Path, Context], Case]:
    def build(d: Path, ctx: Context) -> Case:
        img = gradient(48, 64, np.float32)
        img[10, 10] = value
        return write(d, f"float_{value}.tif", tiff_bytes(img))

    return build


def _palette_png(d: Path, ctx: Context) -> Case:
    from PIL import Image

    im = Image.fromarray(gradient()).convert("RGB").quantize(16)
    return write(d, "palette.png", pil_bytes(im, "PNG"))


def _rgba_png(d: Path, ctx: Context) -> Case:
    rgba = np.dstack([gradient()] * 3 + [np.full((48, 64), 128, np.uint8)])
    return write(d, "rgba.png", png_bytes(rgba))


def _gray_alpha_png(d: Path, ctx: Context) -> Case:
    from PIL import Image

    im = Image.merge("LA", [Image.fromarray(gradient()), Image.fromarray(np.full((48, 64), 200, np.uint8))])
    return write(d, "gray_alpha.png", pil_bytes(im, "PNG"))


def _png_16bit(d: Path, ctx: Context) -> Case:
    from PIL import Image

    im = Image.fromarray(gradient(dtype=np.uint16))
    return write(d, "gray16.png", pil_bytes(im, "PNG"))


def _cmyk_jpeg(d: Path, ctx: Context) -> Case:
    from PIL import Image

    return write(d, "cmyk.jpg", pil_bytes(Image.open(SAMPLE_PNG).convert("CMYK"), "JPEG"))


IMAGE_INPUTS = [
    # empty and truncated / corrupt files
    BadInput("zero-byte PNG", "image", "refused", ImageReadError, lambda d, c: write(d, "empty.png", b"")),
    BadInput("zero-byte DICOM", "image", "refused", ImageReadError, lambda d, c: write(d, "empty.dcm", b"")),
    BadInput("zero-byte NIfTI", "image", "refused", ImageReadError, lambda d, c: write(d, "empty.nii.gz", b"")),
    BadInput("zero-byte TIFF", "image", "refused", ImageReadError, lambda d, c: write(d, "empty.tif", b"")),
    BadInput("truncated PNG", "image", "refused", ImageReadError,
             lambda d, c: write(d, "truncated.png", cut(SAMPLE_PNG.read_bytes(), 0.5))),
    BadInput("PNG with a corrupt header CRC", "image", "refused", ImageReadError,
             lambda d, c: write(d, "bad_crc.png", png_declaring(64, 48, bad_crc=True))),
    BadInput("PNG signature then garbage", "image", "refused", ImageReadError,
             lambda d, c: write(d, "garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)),
    BadInput("truncated JPEG", "image", "refused", ImageReadError,
             lambda d, c: write(d, "truncated.jpg", cut(jpeg_bytes(), 0.5))),
    BadInput("JPEG marker then garbage", "image", "refused", ImageReadError,
             lambda d, c: write(d, "garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)),
    BadInput("truncated TIFF", "image", "refused", ImageReadError,
             lambda d, c: write(d, "truncated.tif", cut(tiff_bytes(gradient(256, 256)), 0.3))),
    BadInput("TIFF whose first IFD lies past the end", "image", "refused", ImageReadError,
             lambda d, c: write(d, "bad_ifd.tif", b"II*\x00" + struct.pack("<I", 1 << 30) + bytes(64))),
    BadInput("truncated DICOM (inside pixel data)", "image", "refused", ImageReadError, _dicom_truncated),
    BadInput("DICOM preamble then garbage", "image", "refused", ImageReadError,
             lambda d, c: write(d, "garbage.dcm", bytes(128) + b"DICM" + bytes(range(256)) * 4)),
    BadInput("truncated NIfTI (.nii)", "image", "refused", ImageReadError,
             lambda d, c: write(d, "truncated.nii", cut(nifti_bytes(gradient_volume(64, 64, 8, np.float32)), 0.4))),
    BadInput("truncated NIfTI (.nii.gz)", "image", "refused", ImageReadError,
             lambda d, c: write(d, "truncated.nii.gz",
                                cut(gzip.compress(nifti_bytes(gradient_volume(64, 64, 8, np.float32))), 0.5))),
    BadInput("gzip of garbage named .nii.gz", "image", "refused", ImageReadError,
             lambda d, c: write(d, "garbage.nii.gz", gzip.compress(bytes(range(256)) * 2))),
    # wrong extensions
    BadInput("text file named .png", "image", "refused", ImageReadError,
             lambda d, c: write(d, "notes.png", b"patient notes, not an image\n")),
    BadInput("NIfTI bytes named .png", "image", "refused", ImageReadError,
             lambda d, c: write(d, "volume.png", nifti_bytes(gradient(16, 16, np.float32)))),
    BadInput("JPEG bytes named .tif", "image", "refused", ImageReadError,
             lambda d, c: write(d, "photo.tif", jpeg_bytes())),
    BadInput("PNG named .gif (unsupported suffix)", "image", "refused", ImageReadError,
             lambda d, c: write(d, "image.gif", SAMPLE_PNG.read_bytes())),
    BadInput("PNG bytes named .jpg", "image", "converted", None,
             lambda d, c: write(d, "really_png.jpg", SAMPLE_PNG.read_bytes()),
             "read by content (Pillow sniffs the format)"),
    BadInput("DICOM bytes named .png", "image", "converted", None,
             lambda d, c: write(d, "really_dicom.png", dicom_bytes(ct_dataset())),
             "read as DICOM ('DICM' signature wins over the suffix)"),
    # degenerate sizes and decompression bombs
    BadInput("1x1 PNG", "image", "refused", ImageReadError,
             lambda d, c: write(d, "one_pixel.png", png_bytes(np.full((1, 1), 7, np.uint8)))),
    BadInput("1x1 TIFF", "image", "refused", ImageReadError,
             lambda d, c: write(d, "one_pixel.tif", tiff_bytes(np.full((1, 1), 7, np.uint8)))),
    BadInput("0-width PNG header", "image", "refused", ImageReadError,
             lambda d, c: write(d, "zero_width.png", png_declaring(0, 48))),
    BadInput("DICOM with Rows = 0", "image", "refused", ImageReadError, _dicom_zero_rows),
    BadInput("NIfTI with a 0-length axis", "image", "refused", ImageReadError, _nifti_zero),
    BadInput("PNG bomb 100000 x 100000", "image", "refused", ImageReadError,
             lambda d, c: write(d, "bomb_huge.png", png_declaring(100_000, 100_000)), tags=("bomb",)),
    BadInput("PNG bomb 12000 x 12000 (under Pillow's limit)", "image", "refused", ImageReadError,
             lambda d, c: write(d, "bomb_12k.png", png_declaring(12_000, 12_000)), tags=("bomb",)),
    BadInput("TIFF bomb 200000 x 200000", "image", "refused", ImageReadError,
             lambda d, c: write(d, "bomb.tif", tiff_declaring(200_000, 200_000)), tags=("bomb",)),
    BadInput("DICOM bomb 65535 x 65535 x 1000 frames", "image", "refused", ImageReadError, _dicom_bomb, tags=("bomb",)),
    BadInput("NIfTI bomb 30000 x 30000 x 2000", "image", "refused", ImageReadError, _nifti_bomb, tags=("bomb",)),
    # odd pixel types
    BadInput("16-bit gray PNG", "image", "converted", None, _png_16bit, "min-max scaled to 0..255"),
    BadInput("16-bit gray TIFF", "image", "converted", None,
             lambda d, c: write(d, "gray16.tif", tiff_bytes(gradient(dtype=np.uint16))), "min-max scaled to 0..255"),
    BadInput("signed int16 TIFF", "image", "converted", None,
             lambda d, c: write(d, "signed.tif", tiff_bytes(gradient(dtype=np.int16))), "min-max scaled to 0..255"),
    BadInput("signed int16 NIfTI volume", "image", "converted", None,
             lambda d, c: write(d, "signed.nii.gz", gzip.compress(nifti_bytes(gradient_volume(32, 32, 3, np.int16)))),
             "0.5-99.5 percentile window per volume"),
    BadInput("float32 TIFF (finite)", "image", "converted", None,
             lambda d, c: write(d, "float.tif", tiff_bytes(gradient(dtype=np.float32))), "min-max scaled to 0..255"),
    BadInput("float TIFF with NaN", "image", "refused", ImageReadError, _tiff_with(float("nan"))),
    BadInput("float TIFF with Inf", "image", "refused", ImageReadError, _tiff_with(float("inf"))),
    BadInput("float NIfTI with NaN", "image", "refused", ImageReadError, _nifti_with(float("nan"))),
    BadInput("float NIfTI with -Inf", "image", "refused", ImageReadError, _nifti_with(float("-inf"))),
    BadInput("RGBA PNG", "image", "converted", None, _rgba_png, "alpha dropped"),
    BadInput("palette PNG", "image", "converted", None, _palette_png, "palette expanded to RGB"),
    BadInput("gray+alpha (2-channel) PNG", "image", "converted", None, _gray_alpha_png,
             "alpha dropped, gray replicated"),
    BadInput("2-channel TIFF", "image", "converted", None,
             lambda d, c: write(d, "two_channel.tif", tiff_bytes(np.dstack([gradient(), gradient()[::-1]]),
                                                                 photometric="minisblack", planarconfig="contig")),
             "first channel used as gray"),
    BadInput("CMYK JPEG", "image", "converted", None, _cmyk_jpeg, "converted to RGB"),
    BadInput("4-D NIfTI (16 x 16 x 4 x 3)", "image", "refused", ImageReadError,
             lambda d, c: write(d, "four_d.nii.gz", gzip.compress(nifti_bytes(np.ones((16, 16, 4, 3), np.float32))))),
    BadInput("DICOM without pixel data", "image", "refused", ImageReadError, _dicom_without_pixels),
    BadInput("DICOM in HTJ2K (no decoder installed)", "image", "refused", ImageReadError, _htj2k_dicom),
]


# -- checkpoints -----------------------------------------------------------------------------------
def _edited_checkpoint(name: str, edit: Callable[[dict], None]) -> Callable[[Path, Context], Case]:
    """The tiny native checkpoint with its tensors edited and its espmed config kept."""

    def build(d: Path, ctx: Context) -> Case:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(ctx.checkpoint), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        edit(tensors)
        path = d / name
        save_file(tensors, str(path), metadata=meta)
        return Case(path)

    return build


def _drop_key(t: dict) -> None:
    del t[sorted(t)[0]]


def _add_key(t: dict) -> None:
    import torch

    t["decoder.backdoor.weight"] = torch.zeros(4)


def _reshape_key(t: dict) -> None:
    import torch

    key = next(k for k in sorted(t) if t[k].ndim == 2)
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def _nan_weight(t: dict) -> None:
    key = next(k for k in sorted(t) if t[k].is_floating_point() and t[k].numel() > 1)
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")


class Payload:
    """Unpickling this runs `touch <marker>`: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _pickle_checkpoint(zip_format: bool) -> Callable[[Path, Context], Case]:
    def build(d: Path, ctx: Context) -> Case:
        import torch

        marker = d / PAYLOAD_MARKER
        path = d / ("evil_zip.pth" if zip_format else "evil_raw.pth")
        obj = {"state_dict": {"w": torch.zeros(2)}, "hook": Payload(marker)}
        if zip_format:
            torch.save(obj, path)
        else:
            path.write_bytes(pickle.dumps(obj))
        return Case(path, marker=marker)

    return build


def _no_config_safetensors(d: Path, ctx: Context) -> Case:
    import torch
    from safetensors.torch import save_file

    path = d / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    return Case(path)


CHECKPOINT_INPUTS = [
    BadInput("checkpoint with a missing key", "checkpoint", "refused", CheckpointError,
             _edited_checkpoint("missing_key.safetensors", _drop_key)),
    BadInput("checkpoint with an extra key", "checkpoint", "refused", CheckpointError,
             _edited_checkpoint("extra_key.safetensors", _add_key)),
    BadInput("checkpoint with a wrong-shape tensor", "checkpoint", "refused", CheckpointError,
             _edited_checkpoint("wrong_shape.safetensors", _reshape_key)),
    BadInput("checkpoint with a NaN weight", "checkpoint", "refused", CheckpointError,
             _edited_checkpoint("nan_weight.safetensors", _nan_weight)),
    BadInput("truncated safetensors checkpoint", "checkpoint", "refused", CheckpointError,
             lambda d, c: write(d, "truncated.safetensors", cut(c.checkpoint.read_bytes(), 0.5))),
    BadInput("safetensors without an espmed config", "checkpoint", "refused", CheckpointError, _no_config_safetensors),
    BadInput("zip .pth whose pickle runs os.system", "checkpoint", "refused", CheckpointError,
             _pickle_checkpoint(True), "weights_only=True refuses the global"),
    BadInput("raw pickle .pth that runs os.system", "checkpoint", "refused", CheckpointError,
             _pickle_checkpoint(False), "not a zip checkpoint: never unpickled"),
]


# -- artifacts -------------------------------------------------------------------------------------
def copy_artifact(src: Path, d: Path) -> Path:
    """Copy an artifact with its sibling files and manifest into `d`; returns the copy."""
    for f in src.parent.iterdir():
        if f.name.startswith(src.stem) and not f.name.startswith("."):
            shutil.copy(f, d / f.name)
    return d / src.name


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _tampered(which: str, member_suffix: str | None = None) -> Callable[[Path, Context], Case]:
    def build(d: Path, ctx: Context) -> Case:
        artifact = copy_artifact(getattr(ctx, which), d)
        member = artifact.with_suffix(member_suffix) if member_suffix else artifact
        if member.suffix == ".xml":
            member.write_bytes(member.read_bytes().replace(b'version="', b'version ="', 1))
        else:
            flip_byte(member, 0.7)
        return Case(artifact)

    return build


def engine_metadata(ctx: Context, trt_version: str, gpu: str, cc: str):
    from espmed.runtimes import load

    meta = load(ctx.onnx, verify=False).metadata
    meta.target, meta.backend = "trt-fp16", "tensorrt"
    meta.extra = {"tensorrt_version": trt_version, "gpu_name": gpu, "compute_capability": cc}
    return meta


def _engine(name: str, trt_version: str, gpu: str, cc: str, tamper: bool = False) -> Callable[[Path, Context], Case]:
    """An espmed engine file (header + an opaque plan) with its manifest, optionally tampered."""

    def build(d: Path, ctx: Context) -> Case:
        from espmed.export.manifest import manifest_dict, manifest_path
        from espmed.runtimes.engine_header import write_engine

        meta = engine_metadata(ctx, trt_version, gpu, cc)
        path = write_engine(d / name, meta, b"serialized TensorRT plan " * 64)
        manifest_path(path).write_text(json.dumps(manifest_dict(meta, [path])))
        if tamper:
            flip_byte(path, 0.9)
        return Case(path)

    return build


def _bare_plan(d: Path, ctx: Context) -> Case:
    return write(d, "bare.engine", b"ftrt" + bytes(512))


def _size_mismatch(d: Path, ctx: Context) -> Case:
    """Graph built for 256 px, metadata (and a consistent manifest) claiming 320 px."""
    import onnx

    from espmed.export.manifest import manifest_dict, manifest_path
    from espmed.runtimes.metadata import METADATA_KEY, ArtifactMetadata

    model = onnx.load(str(ctx.onnx))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = ArtifactMetadata.from_json(prop.value)
    meta.input_size = 320
    prop.value = meta.to_json()
    path = d / "says_320.onnx"
    onnx.save(model, str(path))
    manifest_path(path).write_text(json.dumps(manifest_dict(meta, [path])))
    return Case(path)


def _modality(which: str, modality: str) -> Callable[[Path, Context], Case]:
    def build(d: Path, ctx: Context) -> Case:
        return Case(getattr(ctx, which), modality=modality)

    return build


ARTIFACT_INPUTS = [
    BadInput("ONNX whose bytes no longer match the manifest", "artifact", "refused", ArtifactError, _tampered("onnx")),
    BadInput("OpenVINO .xml edited after export", "artifact", "refused", ArtifactError, _tampered("openvino")),
    BadInput("OpenVINO .bin whose bytes no longer match", "artifact", "refused", ArtifactError,
             _tampered("openvino", ".bin")),
    BadInput("TensorRT engine whose bytes no longer match", "artifact", "refused", ArtifactError,
             _engine("tampered.engine", *HERE_TRT, tamper=True)),
    BadInput("bare TensorRT plan without the espmed header", "artifact", "refused", ArtifactError, _bare_plan),
    BadInput("ONNX graph for 256 px, metadata says 320 px", "artifact", "refused", ArtifactError, _size_mismatch),
    BadInput("random bytes named .onnx", "artifact", "refused", ArtifactError,
             lambda d, c: write(d, "noise.onnx", bytes(range(256)) * 16)),
    BadInput("brain artifact run with --modality nuclei", "artifact", "refused", ModalityError,
             _modality("onnx", "nuclei")),
    BadInput("unknown modality for an artifact", "artifact", "refused", ModalityError, _modality("onnx", "spleen")),
    BadInput("unknown modality for a checkpoint", "artifact", "refused", ModalityError,
             _modality("checkpoint", "spleen")),
    BadInput("engine header from another TensorRT version", "engine", "refused", ArtifactError,
             _engine("old_trt.engine", "8.6.1", *HERE_TRT[1:]), "CLI here stops earlier: no TensorRT on this machine",
             cli_error=BackendUnavailableError),
    BadInput("engine header from another GPU", "engine", "refused", ArtifactError,
             _engine("orin.engine", HERE_TRT[0], "Orin (nvgpu)", "8.7"),
             "CLI here stops earlier: no TensorRT on this machine",
             cli_error=BackendUnavailableError),
]

CORPUS: list[BadInput] = IMAGE_INPUTS + CHECKPOINT_INPUTS + ARTIFACT_INPUTS
assert len({b.name for b in CORPUS}) == len(CORPUS), "corpus names must be unique"
