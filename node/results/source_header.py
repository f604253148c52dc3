"""The source attributes our results copy, made valid before any builder sees them.

A real PACS sends what it has: dates written ``1970-01-01``, ``Male`` for a
Patient's Sex, over-long descriptions, values under the wrong VR, no Imager
Pixel Spacing. highdicom and pydicom refuse such values when we *build* (and
pydicom's warnings quote them, patient data included), so every attribute the
SC and SR copy is checked here first: a valid value is copied verbatim, a value
with one obvious reading is repaired, anything else is dropped (a Type 2
attribute is then left empty). Each repair or drop is a ``SourceRepair`` naming
the attribute and what was done, never the value, for the audit trail.

Two attributes are never altered: the UIDs (checked at ingest) and PatientID,
which the PACS files the result by: a truncated PatientID could name another
patient, so an over-long one is kept verbatim (and reported) instead.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, config
from pydicom.datadict import dictionary_has_tag, dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import VALIDATORS, format_number_as_ds

from node.results.lossy import LossyHistory, lossy_history

PATIENT_AND_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "ProcedureCodeSequence", "RequestingService", "AdmittingDiagnosesDescription",
)  # fmt: skip
IMAGE_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
    "Rows", "Columns", "BodyPartExamined", "Laterality", "ImageLaterality", "PatientOrientation",
    "ImagerPixelSpacing",
)  # fmt: skip
KEPT_VERBATIM = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# identifiers: a cut value could name another record, so an over-long one is dropped, never truncated
_IDENTIFIERS = ("AccessionNumber", "StudyID", "IssuerOfPatientID")
_DATE = re.compile(r"^(\d{4})[-./ ]?(\d{2})[-./ ]?(\d{2})$")
_TIME = re.compile(r"^(\d{2}):?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # LT/ST/UT keep TAB, LF, FF, CR
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64, "UC": 65535}


@dataclass(frozen=True)
class SourceRepair:
    """One attribute of a source that could not be copied verbatim: what was done, and why (no value)."""

    source_sop_instance_uid: str
    keyword: str
    action: str  # "repaired", "dropped" or "kept"
    reason: str

    def __post_init__(self) -> None:
        if self.action not in ("repaired", "dropped", "kept"):
            raise ValueError(f"repair action {self.action!r} is not repaired, dropped or kept")

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source_sop_instance_uid, "keyword": self.keyword, "action": self.action,
                "reason": self.reason}  # fmt: skip


@dataclass(frozen=True)
class SourceHeader:
    """A valid copy of the attributes results take from a source (no pixels), and what it took to make it."""

    dataset: Dataset
    lossy: LossyHistory
    repairs: tuple[SourceRepair, ...]

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Read values without pydicom warning or logging them (its messages quote the value: PHI)."""
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = previous


def clean_source_header(source: Dataset) -> SourceHeader:
    """The attributes of ``source`` our SC and SR copy, each valid or absent, with the repairs made."""
    uid = str(source.get("SOPInstanceUID", ""))
    header = Dataset()
    repairs: list[SourceRepair] = []
    with quiet_pydicom():
        for keyword in (*IMAGE_KEYWORDS, *PATIENT_AND_STUDY_KEYWORDS):
            tag = tag_for_keyword(keyword)
            if tag is None or tag not in source:
                continue
            element, note = _clean(source, tag, keyword)
            if note is not None:
                repairs.append(SourceRepair(uid, keyword, *note))
            if element is not None:
                header.add(element)
        lossy = lossy_history(source)
    repairs.extend(SourceRepair(uid, keyword, "repaired", reason) for keyword, reason in lossy.notes)
    return SourceHeader(header, lossy, tuple(repairs))


def _clean(source: Dataset, tag: int, keyword: str) -> tuple[DataElement | None, tuple[str, str] | None]:
    """(the element to copy or None, (action, reason) when it is not the source's verbatim)."""
    try:
        element = source[tag]
    except (ValueError, TypeError, KeyError, UnicodeError, OverflowError) as error:
        return None, ("dropped", f"unreadable ({type(error).__name__})")
    expected = dictionary_VR(tag)
    if element.VR == "SQ" or expected == "SQ":
        return _clean_sequence(element, expected)
    note: tuple[str, str] | None = None
    if element.VR != expected and not (" or " in expected and element.VR in expected.split(" or ")):
        note = ("repaired", f"sent with VR {element.VR}, read as {expected}")
        reread = _as_vr(element, expected)
        if reread is None:
            return None, ("dropped", f"sent with VR {element.VR}, unreadable as {expected}")
        element = reread
    if keyword in KEPT_VERBATIM:
        valid = _valid(element.VR, _values(element.value)) and _vm_ok(element)
        return element, note if valid else ("kept", "invalid but kept verbatim: results are filed by it")
    values = _values(element.value)
    if _valid(element.VR, values) and _vm_ok(element) and not _has_controls(element.VR, values, source):
        return element, note
    fixed = _repair(keyword, element.VR, values, source)
    if fixed is None or not _valid(element.VR, fixed) or not _vm_ok_values(tag, fixed):
        return None, ("dropped", f"invalid {element.VR} value")
    value: Any = fixed[0] if len(fixed) == 1 else fixed
    return DataElement(tag, element.VR, value, validation_mode=config.IGNORE), ("repaired", _why(element.VR))


def _clean_sequence(element: DataElement, expected: str) -> tuple[DataElement | None, tuple[str, str] | None]:
    if element.VR != "SQ" or expected != "SQ" or not isinstance(element.value, Sequence):
        return None, ("dropped", f"sent with VR {element.VR} where {expected} is expected")
    if all(_item_valid(item) for item in element.value):
        return element, None
    return None, ("dropped", "a sequence item holds an invalid value")


def _item_valid(item: Dataset) -> bool:
    for element in item:
        if element.VR == "SQ":
            if not all(_item_valid(nested) for nested in element.value):
                return False
        elif not _valid(element.VR, _values(element.value)):
            return False
    return True


def _as_vr(element: DataElement, vr: str) -> DataElement | None:
    """The value re-read under its dictionary VR (text VRs only), or None."""
    if vr not in _MAX_LENGTH and vr not in ("DA", "TM", "DT", "AS", "DS", "IS", "UI"):
        return None
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = "\\".join(str(v) for v in _values(value)).strip(" \x00")
    parts = text.split("\\") if text else []
    return DataElement(element.tag, vr, parts[0] if len(parts) == 1 else parts, validation_mode=config.IGNORE)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _valid(vr: str, values: list[Any]) -> bool:
    validator: Callable[[str, Any], tuple[bool, str]] | None = VALIDATORS.get(vr)
    if validator is None:
        return True
    for value in values:
        ok = validator(vr, str(value) if vr in ("DS", "IS") else value)[0]
        if not ok or (vr == "DA" and not _real_date(str(value))):
            return False
    return True


def _vm_ok(element: DataElement) -> bool:
    return _vm_ok_values(element.tag, _values(element.value))


def _vm_ok_values(tag: int, values: list[Any]) -> bool:
    if not values or not dictionary_has_tag(tag):
        return True
    vm = dictionary_VM(tag)
    if vm == "1":
        return len(values) == 1
    if vm.isdigit():
        return len(values) == int(vm)
    return True


def _has_controls(vr: str, values: list[Any], source: Dataset) -> bool:
    if vr not in _MAX_LENGTH or _uses_code_extensions(source):
        return False
    pattern = _TEXT_CONTROL if vr in ("ST", "LT", "UT") else _CONTROL
    return any(pattern.search(str(value)) for value in values)


def _uses_code_extensions(source: Dataset) -> bool:
    """ISO 2022 character sets switch with ESC sequences: ESC is then part of the text."""
    charset = source.get("SpecificCharacterSet") or ""
    terms = charset if isinstance(charset, (list, MultiValue)) else [charset]
    return any("2022" in str(term) for term in terms)


def _repair(keyword: str, vr: str, values: list[Any], source: Dataset) -> list[Any] | None:
    """The values with their one obvious reading, or None when there is none."""
    fixed: list[Any] = []
    for value in values:
        repaired = _repair_one(keyword, vr, value, source)
        if repaired is None:
            return None
        fixed.append(repaired)
    return fixed


def _repair_one(keyword: str, vr: str, value: Any, source: Dataset) -> Any | None:
    text = str(value).strip()
    if vr == "DA":
        match = _DATE.match(text)
        return "".join(match.groups()) if match and _real_date("".join(match.groups())) else None
    if vr == "TM":
        match = _TIME.match(text)
        return "".join(group or "" for group in match.groups()) if match else None
    if keyword == "PatientSex":
        return _SEX.get(text.upper())
    if vr == "CS":
        return re.sub(r"[ -]+", "_", text.upper())
    if vr in ("DS", "IS"):
        return _number(vr, text)
    if vr in _MAX_LENGTH:
        if not _uses_code_extensions(source):
            text = (_TEXT_CONTROL if vr in ("ST", "LT", "UT") else _CONTROL).sub("", text)
        too_long = len(text) > _MAX_LENGTH[vr] if vr != "PN" else any(len(g) > 64 for g in text.split("="))
        if too_long and keyword in _IDENTIFIERS:
            return None
        if vr == "PN":
            return "=".join(group[:64] for group in text.split("="))
        return text[: _MAX_LENGTH[vr]]
    return None


def _number(vr: str, text: str) -> str | None:
    try:
        number = float(text)
    except ValueError:
        return None
    if vr == "IS":
        return str(int(number)) if number.is_integer() and abs(number) < 2**31 else None
    return format_number_as_ds(number)


def _real_date(text: str) -> bool:
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return len(text) != 8  # DA ranges or partial values: the validator judged them
    return True


def _why(vr: str) -> str:
    if vr == "DA":
        return "date rewritten as YYYYMMDD"
    if vr == "TM":
        return "time rewritten as HHMMSS"
    if vr in ("DS", "IS"):
        return f"number rewritten as {vr}"
    if vr == "CS":
        return "code string normalised"
    return f"{vr} value cut to its maximum length or cleared of control characters"
