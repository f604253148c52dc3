"""Property-based tests of the data set parsing path with mutated bytes (hypothesis, derandomised).

The seed is a valid instance with its file meta, as the SCP hands it to the
ingest path. Mutations flip, overwrite, insert and cut bytes anywhere. The
properties: ``read_header`` accepts or raises ``InstanceRejectedError`` and
nothing else; it never accepts bytes pydicom cannot fully decode; ``Ingestor
.receive`` never raises, and answers success only with an accepted audit row and
a spooled file holding exactly the bytes received.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import Instance, InstanceStatus
from node.errors import InstanceRejectedError, StoreStatus
from node.ingest import Ingestor, StoreRequest
from node.inspect_instance import read_header
from node.spool import Spool
from tests.reliability.harness import phi_image

SEED = phi_image(seed=7)
SOP_CLASS, SOP_INSTANCE = str(SEED.SOPClassUID), str(SEED.SOPInstanceUID)
_buffer = io.BytesIO()
SEED.save_as(_buffer, enforce_file_format=True)
SEED_BYTES = _buffer.getvalue()
HEADER_END = SEED_BYTES.index(b"\xe0\x7f\x10\x00")  # mutations mostly land before the pixel data

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, min(len(data), HEADER_END + 64)))
        operation = draw(st.sampled_from(["flip", "overwrite", "insert", "cut", "truncate"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if operation == "flip" and where < len(data):
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "overwrite":
            data[where : where + len(chunk)] = chunk
        elif operation == "insert":
            data[where:where] = chunk
        elif operation == "cut":
            del data[where : where + len(chunk)]
        else:
            del data[where:]
    return bytes(data)


def fully_decodes(data: bytes) -> bool:
    """pydicom reads the bytes and converts every element's value, nested ones included."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            for element in ds.iterall():
                _ = element.value
    except Exception:  # noqa: BLE001 - any failure to decode means "does not parse"
        return False
    return True


def test_property_seed_is_accepted() -> None:
    """Sanity: the unmutated seed passes the header check and decodes fully."""
    assert read_header(SEED_BYTES, SOP_CLASS, SOP_INSTANCE).sop_instance_uid == SOP_INSTANCE
    assert fully_decodes(SEED_BYTES)


@PROPERTY_SETTINGS
@given(data=mutated())
def test_property_read_header_accepts_or_rejects_only(data: bytes) -> None:
    """Mutated bytes: InstanceRejectedError or an accepted header, and accepted only if pydicom decodes all."""
    try:
        read_header(data, SOP_CLASS, SOP_INSTANCE)
    except InstanceRejectedError:
        return
    assert fully_decodes(data), "accepted bytes that pydicom cannot decode"


@pytest.fixture(scope="module")
def ingestor(tmp_path_factory: pytest.TempPathFactory) -> Ingestor:
    root = tmp_path_factory.mktemp("property-ingest")
    url = f"sqlite:///{root / 'audit.sqlite3'}"
    upgrade(url)
    return Ingestor(Spool(root / "spool"), AuditDB(url), "property-test")


@PROPERTY_SETTINGS
@given(data=mutated())
def test_property_ingest_success_only_when_kept_whole(data: bytes, ingestor: Ingestor) -> None:
    """Ingestor.receive: any exception it lets out becomes 0x0110 at the SCP boundary; a success is kept whole."""
    request = StoreRequest(data, SOP_CLASS, SOP_INSTANCE, association_id=None)
    try:
        result = ingestor.receive(request)
    except InstanceRejectedError:
        pytest.fail("receive must turn a rejection into a status, not raise it")
    except Exception:  # noqa: BLE001 - the SCP answers PROCESSING_FAILURE: never a false success
        return
    if result.status != StoreStatus.SUCCESS:
        return
    with ingestor.audit.session() as session:
        rows = session.query(Instance).filter(Instance.sop_instance_uid == SOP_INSTANCE).all()
    kept = [row for row in rows if row.status == InstanceStatus.ACCEPTED]
    assert len(kept) == 1
    stored = Path(str(kept[0].spool_path)).read_bytes()
    # issue 9: a second copy with other bytes is a CONFLICT (kept in quarantine), with its own hash
    digest = hashlib.sha256(data).hexdigest()
    assert stored == data or any(row.status in (InstanceStatus.DUPLICATE, InstanceStatus.CONFLICT)
                                 and row.sha256 == digest for row in rows)  # fmt: skip
