"""Walk an encoded instance as pydicom will read it: where its body starts, how it is encoded, and
how many sequence items and nesting levels it holds, without building a data set.

issue 9: the sequence limits must see every item pydicom parses. pydicom reads the file meta
element by element (its group length only logged when it disagrees), reads any command group
after it, and when the meta names no transfer syntax guesses the body's encoding from its first
bytes; a walk that trusts the group length, or stops for want of a syntax, can be pointed past a
bomb pydicom still reads. So the meta and command groups are walked as ``_read_file_meta_info``
and ``_read_command_set_elements`` read them, and the encoding is chosen as ``read_partial``
chooses it (pydicom 3.0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)

from node.errors import LimitExceededError

if TYPE_CHECKING:
    from node.limits import ResourceLimits

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = (0x7FE0, 0x0010)
_TRANSFER_SYNTAX = 0x00020010
KNOWN_VRS = frozenset(  # every VR of PS3.5 as it appears in explicit VR bytes
    vr.encode("ascii") for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD",
                                  "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI",
                                  "UL", "UN", "UR", "US", "UT", "UV")
)  # fmt: skip
_HEADER = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}  # tag and 4-byte length, by little endian
_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))


@dataclass(frozen=True)
class Body:
    """Where and how pydicom reads the data set: from ``offset`` on (the inflated stream when ``deflated``)."""

    offset: int
    explicit: bool
    little: bool
    deflated: bool


@dataclass(frozen=True)
class _TopElement:
    tag: int
    vr: bytes | None  # None: read as implicit VR
    start: int
    length: int


@dataclass
class _Open:
    """A sequence, item or encapsulated pixel data being walked; ``end`` None while its length is undefined."""

    kind: str  # "sequence", "item" or "fragments"
    end: int | None
    explicit: bool
    tag: tuple[int, int]  # the sequence's or pixel data's; an item's is its sequence's


class SequenceWalk:
    """Counts sequence items (and pixel fragments) and sequence nesting over every part pydicom parses.

    Iterative on purpose: a nesting bomb must not recurse. Stops at the first structure it
    cannot follow; the parser judges that part. One walk per instance: the item count is
    the instance's, meta and body together.

    On the way it notes the first length that lies inside a sequence (``fault``): an element
    or item claiming more bytes than its item or sequence holds, or a sequence of undefined
    length the data ends inside. pydicom reads past such an end without complaint, and only
    the top-level elements keep their declared lengths for ``read_header`` to compare.
    """

    def __init__(self, limits: ResourceLimits) -> None:
        self.limits = limits
        self.items = 0
        self.open: list[_Open] = []
        self.top: list[_TopElement] | None = None  # top-level elements, recorded while walking a group
        self.implicit_switch = bool(config.assume_implicit_vr_switch)
        self.buffer: bytes | memoryview = b""
        self.little = True
        self.fault: str | None = None

    def body(self, data: bytes) -> Body | None:
        """The body as ``read_partial`` finds it after the preamble, file meta and command groups; None if none."""
        if len(data) < 132 or data[128:132] != b"DICM":
            return None  # dcmread without force refuses it: nothing is parsed
        view = memoryview(data)
        # pydicom retries a meta whose first VR it does not know as implicit VR (its issue 503), but
        # read_dataset's own look at that VR reads it as explicit again: one reading is enough
        meta_end, top = self._group(view, 132, 0x0002, explicit=True)
        if meta_end < 0:
            return None  # the meta runs past the end: pydicom reads no body
        offset, _ = self._group(view, meta_end, 0x0000, explicit=False)
        if offset < 0 or offset >= len(data):
            return None
        syntaxes = [element for element in top if element.tag == _TRANSFER_SYNTAX]
        if not syntaxes:
            return _guessed(data, offset)
        return _named(_syntax_value(view, syntaxes[-1]), offset)

    def _group(self, view: memoryview, start: int, group: int, explicit: bool) -> tuple[int, list[_TopElement]]:
        self.top = []
        try:
            return self.run(view, start, explicit, True, stop_group=group), self.top
        finally:
            self.top = None
            self.open.clear()

    def run(
        self, buffer: bytes | memoryview, position: int, explicit: bool, little: bool, stop_group: int | None = None
    ) -> int:
        """Walk from ``position``; with ``stop_group``, up to the first top-level element of another group.

        Returns where the walk stopped (the next group's first element), or -1 where an
        element runs past the end.
        """
        self.buffer, self.little = buffer, little
        header = _HEADER[little]
        explicit = self._reads_explicit(position, explicit, top_level=True)
        while position + 8 <= len(buffer):
            while self.open and (end := self.open[-1].end) is not None and position >= end:
                self.open.pop()
            group, element, length = header.unpack_from(buffer, position)
            if stop_group is not None and not self.open:
                stop = self._group_ends(position, group, element, explicit, stop_group)
                if stop is not None:
                    return stop
            if group == 0xFFFE:
                position = self._delimiter(element, length, position + 8)
            else:
                position = self._element((group, element), self.open[-1].explicit if self.open else explicit,
                                         position)  # fmt: skip
            if position < 0:
                return position
        if stop_group is None:
            self._check_closed()
        return len(buffer)  # pydicom reads the last few bytes and ends there

    def _group_ends(self, position: int, group: int, element: int, explicit: bool, wanted: int) -> int | None:
        """Where ``read_dataset`` with a group's ``stop_when`` stops, or None to read this element."""
        if (group, element) == (0xFFFE, 0xE00D):  # ends the data set: pydicom stops after its header
            long = explicit and bytes(self.buffer[position + 4 : position + 6]) in _LONG_VRS
            return position + (12 if long else 8)
        return position if group != wanted else None

    def _reads_explicit(self, position: int, assumed: bool, top_level: bool) -> bool:
        """How ``read_dataset`` reads a data set or item starting here (its ``_is_implicit_vr``).

        It looks at the first element's VR: two capitals say explicit, else implicit. A top-level
        data set takes what it finds, whatever the transfer syntax said; an item of an implicit
        sequence stays implicit, an item of an explicit one may be implicit (PS3.5 6.2.2).
        """
        vr = self.buffer[position + 4 : position + 6]
        if len(vr) < 2 or (not top_level and not assumed):
            return assumed
        return 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B

    def _delimiter(self, element: int, length: int, position: int) -> int:
        if element == 0xE000:  # an item, or a pixel fragment
            self._count_item()
            if self.open and self.open[-1].kind == "fragments":
                return position + length
            tag = self.open[-1].tag if self.open else (0xFFFE, 0xE000)
            if length != _UNDEFINED:
                self._check_inside(position + length, length, None, "sequence")
            explicit = self._reads_explicit(position, self.open[-1].explicit if self.open else True, top_level=False)
            self.open.append(_Open("item", None if length == _UNDEFINED else position + length, explicit, tag))
            return position
        closes = "item" if element == 0xE00D else "sequence"
        while self.open:
            if self.open.pop().kind in (closes, "fragments"):
                break
        return position

    def _element(self, tag: tuple[int, int], explicit: bool, position: int) -> int:
        buffer, u16, u32 = self.buffer, _U16[self.little], _U32[self.little]
        vr: bytes | None = bytes(buffer[position + 4 : position + 6]) if explicit else None
        if vr is not None and vr in _LONG_VRS:
            if position + 12 > len(buffer):
                return -1  # cut inside the header: the parser refuses it
            length, header = int(u32.unpack_from(buffer, position + 8)[0]), 12
        elif vr is not None and (b"AA" <= vr <= b"ZZ" or not self.implicit_switch):
            length, header = int(u16.unpack_from(buffer, position + 6)[0]), 8
        else:  # implicit VR, or pydicom's switch to it on a VR that is no two capitals
            vr, length, header = None, int(u32.unpack_from(buffer, position + 4)[0]), 8
        start = position + header
        if self.top is not None and not self.open:
            self.top.append(_TopElement((tag[0] << 16) | tag[1], vr, start, length))
        if vr is None:
            vr = _implicit_vr(tag)
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                self.open.append(_Open("fragments", None, explicit, tag))
            else:  # SQ, or UN holding a sequence (PS3.5 6.2.2): pydicom reads it in the same VR mode
                self._open_sequence(None, explicit, tag)
            return start
        if self.open:
            self._check_inside(start + length, length, tag, "item")
        if start + length > len(buffer):
            return -1  # runs past the end: truncated, the parser refuses it
        if vr == b"SQ":
            self._open_sequence(start + length, explicit, tag)
            return start
        return start + length

    def _check_inside(self, end: int, length: int, element: tuple[int, int] | None, container: str) -> None:
        """Note an element (or, ``element`` None, an item) ending past the innermost defined end around it."""
        if self.fault is not None:
            return
        bound = next((entry.end for entry in reversed(self.open) if entry.end is not None), None)
        past = "its " + container if bound is not None and end > bound else "the data" if end > len(self.buffer) else ""
        if past:
            sequence = _name(self.open[-1].tag) if self.open else "(none)"
            what = f"element {_name(element)} in sequence {sequence}" if element else f"an item of {sequence}"
            self.fault = f"{what} declares {length} bytes, past the end of {past} (truncated?)"

    def _check_closed(self) -> None:
        """The data ended: a sequence of undefined length still open was cut (fragments: read_header's check)."""
        for entry in self.open:
            if entry.end is None and entry.kind != "fragments" and self.fault is None:
                self.fault = f"sequence {_name(entry.tag)} of undefined length is not closed when the data ends (truncated?)"

    def _open_sequence(self, end: int | None, explicit: bool, tag: tuple[int, int]) -> None:
        self.open.append(_Open("sequence", end, explicit, tag))
        depth = sum(1 for entry in self.open if entry.kind == "sequence")
        if depth > self.limits.max_sequence_depth:
            raise LimitExceededError(
                f"sequences nest deeper than {self.limits.max_sequence_depth} levels (max_sequence_depth)"
            )

    def _count_item(self) -> None:
        self.items += 1
        if self.items > self.limits.max_sequence_items:
            raise LimitExceededError(
                f"the data set holds more than {self.limits.max_sequence_items} sequence items or pixel "
                "fragments (max_sequence_items)"
            )


def _name(tag: tuple[int, int]) -> str:
    return f"({tag[0]:04X},{tag[1]:04X})"


def _implicit_vr(tag: tuple[int, int]) -> bytes:
    try:
        return str(dictionary_VR(tag)).encode("ascii")
    except KeyError:
        return b"UN"  # private or unknown: the parser keeps it as raw bytes


def _syntax_value(view: memoryview, element: _TopElement) -> object:
    """The Transfer Syntax UID's value as ``file_meta.get`` returns it (a UID, other types for odd VRs)."""
    if element.length == _UNDEFINED:
        return None  # no UID: read_partial takes Explicit VR Little Endian
    raw = bytes(view[element.start : element.start + element.length])
    if element.vr == b"UI":
        value = raw.decode("latin-1").rstrip("\0 ")
        return None if "\\" in value else UID(value)  # several values match no syntax
    vr = element.vr.decode("latin-1") if element.vr is not None else None
    try:
        return convert_raw_data_element(
            RawDataElement(Tag(_TRANSFER_SYNTAX), vr, element.length, raw, element.start, vr is None, True)
        ).value
    except Exception:  # noqa: BLE001 - untrusted bytes: then dcmread fails, and walking as explicit costs nothing
        return None


def _named(syntax: object, offset: int) -> Body:
    """The encoding ``read_partial`` takes for a transfer syntax the meta names."""
    if syntax == ImplicitVRLittleEndian:
        return Body(offset, explicit=False, little=True, deflated=False)
    if syntax == ExplicitVRBigEndian:
        return Body(offset, explicit=True, little=False, deflated=False)
    if syntax == DeflatedExplicitVRLittleEndian:
        return Body(offset, explicit=True, little=True, deflated=True)
    if syntax in PrivateTransferSyntaxes:
        private = PrivateTransferSyntaxes[PrivateTransferSyntaxes.index(syntax)]
        return Body(offset, explicit=not private.is_implicit_VR, little=private.is_little_endian, deflated=False)
    return Body(offset, explicit=True, little=True, deflated=False)  # ExplicitVRLittleEndian and all others


def _guessed(data: bytes, offset: int) -> Body | None:
    """No transfer syntax in the meta: ``read_partial`` looks at the first element's VR and group."""
    if offset + 6 > len(data):
        return None  # its struct.unpack fails: nothing is parsed
    group = struct.unpack_from("<H", data, offset)[0]
    explicit = data[offset + 4 : offset + 6] in KNOWN_VRS
    return Body(offset, explicit=explicit, little=not (explicit and group >= 1024), deflated=False)

