"""What the SCP accepts: storage SOP classes and the transfer syntaxes kept as received."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts

# Every syntax here can be decoded by pydicom + pylibjpeg for inference; nothing is transcoded.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def storage_sop_classes() -> list[str]:
    """All storage SOP classes pynetdicom knows: images, SR, presentation states, ..."""
    return [str(context.abstract_syntax) for context in AllStoragePresentationContexts]
