"""Pixel decoders for compressed DICOM, all under permissive licences (the project is Apache-2.0).

pydicom picks a decoder per transfer syntax from what is installed:
- JPEG baseline, JPEG lossless (process 14, SV1), JPEG-LS, JPEG 2000: python-gdcm (GDCM, BSD-3;
  the wheel Apache-2.0), also pyjpegls (CharLS, BSD-3 / MIT) for JPEG-LS and Pillow (MIT-CMU) for
  JPEG baseline / JPEG 2000;
- JPEG 2000 and HTJ2K: pylibjpeg + pylibjpeg-openjpeg (OpenJPEG, BSD-2 / MIT);
- RLE lossless: pydicom's own decoder and pylibjpeg-rle (MIT).
JPEG Extended with 12-bit samples is the one gap: pydicom's GDCM plugin refuses it and the only
pylibjpeg plugin for it (pylibjpeg-libjpeg) is GPL-3. GDCM itself decodes it correctly (its
libjpeg prints "Unsupported JPEG data precision 12" on stderr before retrying with the 12-bit
codec), so this module adds a GDCM plugin for that one case.
"""

from __future__ import annotations

import threading

from pydicom import uid

#: Required by pydicom's plugin interface: what the plugin needs when it is unavailable.
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}
PLUGIN = "espmed-gdcm-12bit"

_registered = False
_lock = threading.Lock()


def is_available(transfer_syntax: str) -> bool:
    """pydicom plugin interface: whether this plugin can decode `transfer_syntax` here."""
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return transfer_syntax == uid.JPEGExtended12Bit


def decode_frame(src: bytes, runner) -> bytes:
    """pydicom plugin interface: one encoded JPEG Extended frame -> its raw little-endian pixels."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(runner.transfer_syntax))))
    bits = runner.bits_stored
    image.SetPixelFormat(
        gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated, bits, bits - 1, runner.pixel_representation)
    )
    # GDCM hands the buffer back as str; surrogateescape restores the bytes.
    return image.GetBuffer().encode("utf-8", "surrogateescape")


def register() -> None:
    """Add the 12-bit JPEG Extended plugin to pydicom's decoder once (idempotent)."""
    global _registered
    with _lock:  # pydicom's add_plugin is not thread-safe
        if _registered:
            return
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid.JPEGExtended12Bit)
        if PLUGIN not in decoder.available_plugins and is_available(uid.JPEGExtended12Bit):
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        _registered = True
