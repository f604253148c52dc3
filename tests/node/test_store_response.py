"""The directly encoded C-STORE-RSP is byte for byte pynetdicom's, and unusual responses still take its path."""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.events import Event

from node.store_response import StoreResponseDIMSE, command_p_data, encode_store_response, install
from tests.factories import CT_IMAGE, DX_FOR_PRESENTATION, make_image, write
from tests.node.raw_dimse import context_ids, encode_body, send_raw_store
from tests.node.test_scp import _storescu

EVEN_UID = "1.2.840.10008.5.1.4.1.1.1.1"  # 26 characters: no padding
ODD_UID = "1.2.840.10008.5.1.4.1.1.1"  # 25 characters: a NUL pads it
LONGEST_UID = "1." + "2" * 62  # 64 characters, the most a UI holds
STATUSES = [0x0000, 0xB000, 0xB007, 0xA700, 0xC000, 0x0122]
MESSAGE_IDS = [1, 65535]
UID_PAIRS = [(ODD_UID, EVEN_UID), (EVEN_UID, ODD_UID), (ODD_UID, LONGEST_UID)]
MAX_PDU_SIZES = [0, 16384, 7, 8, 13, 50]  # 7: one byte per fragment; the others cut the command set unevenly


def store_response(status: int, message_id: int, sop_class: str | None, sop_instance: str | None) -> C_STORE:
    """The primitive ``StorageServiceClass.SCP`` sends back."""
    response = C_STORE()
    response.MessageID = message_id
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = status
    return response


def pynetdicom_p_data(primitive: Any, context_id: int, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [p_data.presentation_data_value_list for p_data in message.encode_msg(context_id, max_pdu)]


@pytest.mark.parametrize("max_pdu", MAX_PDU_SIZES)
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"), UID_PAIRS, ids=["odd-even", "even-odd", "odd-longest"]
)
@pytest.mark.parametrize("message_id", MESSAGE_IDS)
@pytest.mark.parametrize("status", STATUSES, ids=[f"{s:04X}" for s in STATUSES])
def test_store_response_p_data_identical(
    status: int, message_id: int, sop_class: str, sop_instance: str, max_pdu: int
) -> None:
    """Statuses, message IDs, UID lengths and PDU limits: the same PDVs, header bits and fragments."""
    primitive = store_response(status, message_id, sop_class, sop_instance)
    command_set = encode_store_response(primitive)
    assert command_set is not None
    ours = [p_data.presentation_data_value_list for p_data in command_p_data(command_set, 3, max_pdu)]
    assert ours == pynetdicom_p_data(primitive, 3, max_pdu)


def test_store_response_without_uids_identical() -> None:
    """The node's answer to a request with bad UIDs leaves them out (scp._refuse_bad_store_request)."""
    primitive = store_response(0xC000, 7, None, None)
    command_set = encode_store_response(primitive)
    assert command_set is not None
    assert [p.presentation_data_value_list for p in command_p_data(command_set, 1, 0)] == pynetdicom_p_data(
        primitive, 1, 0
    )


UNUSUAL = ["error-comment", "offending-element", "leading-zero-uid", "non-ascii-uid", "uid-too-long", "empty-uid",
           "c-echo"]  # fmt: skip


def unusual_response(name: str) -> Any:
    """A response pynetdicom must encode itself; the UIDs set past the setters, as a peer's may come."""
    with_comment = store_response(0xC000, 1, ODD_UID, EVEN_UID)
    with_comment.ErrorComment = "cannot parse"
    offending = store_response(0xB000, 1, ODD_UID, EVEN_UID)
    offending.OffendingElement = [0x00100010]
    leading_zero = store_response(0, 1, ODD_UID, EVEN_UID)
    leading_zero._affected_sop_instance_uid = "1.02.3"  # pydicom warns about it
    non_ascii = store_response(0, 1, ODD_UID, EVEN_UID)
    non_ascii._affected_sop_instance_uid = "1.2.3\u00e9"
    too_long = store_response(0, 1, ODD_UID, EVEN_UID)
    too_long._affected_sop_instance_uid = LONGEST_UID + "1"
    empty = store_response(0, 1, ODD_UID, EVEN_UID)
    empty._affected_sop_instance_uid = ""
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0
    responses = [with_comment, offending, leading_zero, non_ascii, too_long, empty, echo]
    return dict(zip(UNUSUAL, responses, strict=True))[name]


@pytest.mark.parametrize("name", UNUSUAL)
def test_store_response_unusual_left_to_pynetdicom(name: str) -> None:
    assert encode_store_response(unusual_response(name)) is None


# -- send_msg: what reaches the DUL, through a stand-in association -----------------------


class FakeDUL:
    def __init__(self) -> None:
        self.sent: list[list[tuple[int, bytes]]] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(primitive.presentation_data_value_list)


class FakeAssociation:
    """What ``DIMSEServiceProvider`` and ``evt.trigger`` use of an acceptor's association."""

    def __init__(self, max_pdu: int, handlers: list[Any] | None = None) -> None:
        self.is_requestor = False
        self.requestor = type("Requestor", (), {"maximum_length": max_pdu})()
        self.dul = FakeDUL()
        self._handlers = handlers or []
        self.abort = self._abort_blocking = self._abort_nonblocking = lambda: None
        self.lock = threading.RLock()

    def get_handlers(self, event: Any) -> list[Any]:
        return list(self._handlers) if event is evt.EVT_DIMSE_SENT else []


def sent_by(provider_class: type[DIMSEServiceProvider], primitive: Any, assoc: FakeAssociation) -> list[Any]:
    provider = DIMSEServiceProvider(assoc)  # type: ignore[arg-type]
    provider.__class__ = provider_class
    provider.send_msg(primitive, 5)
    return assoc.dul.sent


@pytest.fixture
def pynetdicom_path(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records each response that went through ``DIMSEServiceProvider.send_msg``."""
    calls: list[Any] = []
    original = DIMSEServiceProvider.send_msg

    def recording(self: Any, primitive: Any, context_id: int) -> None:
        calls.append(primitive)
        original(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", recording)
    return calls


@pytest.mark.parametrize("max_pdu", [0, 16384, 20])
@pytest.mark.parametrize("name", ["usual", *UNUSUAL])
def test_send_msg_same_p_data_as_pynetdicom(name: str, max_pdu: int) -> None:
    """Usual or not, the DUL gets what pynetdicom's ``send_msg`` gives it."""
    primitive = store_response(0, 9, ODD_UID, EVEN_UID) if name == "usual" else unusual_response(name)
    ours, theirs = (
        outcome(provider, primitive, max_pdu) for provider in (StoreResponseDIMSE, DIMSEServiceProvider)
    )
    assert ours == theirs


def outcome(provider_class: type[DIMSEServiceProvider], primitive: Any, max_pdu: int) -> tuple[Any, ...]:
    """What was sent, the warnings pydicom gave and the error it raised, if any."""
    assoc = FakeAssociation(max_pdu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sent_by(provider_class, primitive, assoc)
            error = None
        except Exception as exc:  # noqa: BLE001 - compared, not handled
            error = repr(exc)
    return assoc.dul.sent, [str(w.message) for w in caught], error


def test_send_msg_usual_response_skips_pynetdicom(pynetdicom_path: list[Any]) -> None:
    """With only pynetdicom's standard logging handler bound, the usual response is sent directly."""
    assoc = FakeAssociation(16384, [(standard_dimse_sent_handler, None)])
    sent_by(StoreResponseDIMSE, store_response(0, 1, ODD_UID, EVEN_UID), assoc)
    assert pynetdicom_path == [] and len(assoc.dul.sent) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("name", UNUSUAL)
def test_send_msg_unusual_response_through_pynetdicom(pynetdicom_path: list[Any], name: str) -> None:
    primitive = unusual_response(name)
    try:
        sent_by(StoreResponseDIMSE, primitive, FakeAssociation(16384))
    except UnicodeEncodeError:
        pass  # pydicom's own failure on a non-ASCII UID, as without the fast path
    assert pynetdicom_path == [primitive]


@pytest.mark.parametrize("max_pdu", [1, 6])
def test_send_msg_max_pdu_pynetdicom_refuses_through_pynetdicom(
    pynetdicom_path: list[Any], max_pdu: int
) -> None:
    """A peer's maximum PDU length of 1 to 6 fails in pynetdicom: it still fails there, the same way."""
    with pytest.raises((ValueError, ZeroDivisionError)):
        sent_by(StoreResponseDIMSE, store_response(0, 1, ODD_UID, EVEN_UID), FakeAssociation(max_pdu))
    assert len(pynetdicom_path) == 1


def test_send_msg_other_sent_handler_gets_pynetdicom_message(pynetdicom_path: list[Any]) -> None:
    """A user's EVT_DIMSE_SENT handler may read the DIMSEMessage: then pynetdicom builds and sends it."""
    seen: list[Any] = []
    assoc = FakeAssociation(
        0, [(standard_dimse_sent_handler, None), (lambda event: seen.append(event.message), None)]
    )
    sent_by(StoreResponseDIMSE, store_response(0, 1, ODD_UID, EVEN_UID), assoc)
    assert len(pynetdicom_path) == 1
    assert [type(message) for message in seen] == [C_STORE_RSP]
    assert seen[0].command_set.AffectedSOPInstanceUID == EVEN_UID


def test_standard_sent_handler_silent_for_store_response(caplog: pytest.LogCaptureFixture) -> None:
    """Skipping pynetdicom's standard handler is safe only while it logs nothing for a C-STORE-RSP."""
    message = C_STORE_RSP()
    message.primitive_to_message(store_response(0, 1, ODD_UID, EVEN_UID))
    event = Event(FakeAssociation(0), evt.EVT_DIMSE_SENT, {"message": message})  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
        assert standard_dimse_sent_handler(event) == []
    assert caplog.records == []


def test_install_only_on_pynetdicom_provider() -> None:
    """``install`` swaps the class of pynetdicom's own provider, and leaves another subclass alone."""
    assoc = type("Assoc", (), {})()
    assoc.dimse = DIMSEServiceProvider(FakeAssociation(0))  # type: ignore[arg-type]
    install(assoc)
    assert type(assoc.dimse) is StoreResponseDIMSE

    class Other(DIMSEServiceProvider):
        pass

    assoc.dimse = Other(FakeAssociation(0))  # type: ignore[arg-type]
    install(assoc)
    assert type(assoc.dimse) is Other


# -- end to end: the node's answers on a real association ----------------------------------


def capture_responses(assoc: Any) -> queue.Queue[bytes]:
    """The command set of each message the node sends to ``assoc``, as received."""
    received: queue.Queue[bytes] = queue.Queue()

    def keep(event: Any) -> None:
        received.put(event.message.encoded_command_set.getvalue())

    assoc.bind(evt.EVT_DIMSE_RECV, keep)
    return received


def test_node_answers_byte_identical(raw_association: Any, pynetdicom_path: list[Any]) -> None:
    """Through a pynetdicom SCU: a stored instance, a refused one (0x0122) and one with a bad UID (0xC000)
    get the command sets pynetdicom itself would have encoded, and the node used the direct encoder."""
    service, assoc = raw_association
    received = capture_responses(assoc)
    contexts = context_ids(assoc)
    stored, refused, bad = (make_image(generate_uid(), seed=seed) for seed in (1, 2, 3))
    answers = [
        send_raw_store(assoc, encode_body(stored), DX_FOR_PRESENTATION, stored.SOPInstanceUID,
                       contexts[DX_FOR_PRESENTATION]),
        send_raw_store(assoc, encode_body(refused), DX_FOR_PRESENTATION, refused.SOPInstanceUID,
                       contexts[CT_IMAGE]),
        send_raw_store(assoc, encode_body(bad), DX_FOR_PRESENTATION, "", contexts[DX_FOR_PRESENTATION], wait=5),
    ]  # fmt: skip
    assert [answer.status for answer in answers] == [0x0000, 0x0122, 0xC000]
    expected = [
        store_response(0x0000, 7, DX_FOR_PRESENTATION, stored.SOPInstanceUID),
        store_response(0x0122, 7, DX_FOR_PRESENTATION, refused.SOPInstanceUID),
        store_response(0xC000, 7, DX_FOR_PRESENTATION, None),
    ]
    for primitive in expected:
        [[(_, pdv)]] = pynetdicom_p_data(primitive, 1, 0)
        assert received.get(timeout=5) == pdv[1:]
    responses_via_pynetdicom = [p for p in pynetdicom_path if p.MessageIDBeingRespondedTo is not None]
    assert responses_via_pynetdicom == [], "the node's answers went through pynetdicom's encoder"
    server_side = service.scp._server.active_associations
    assert server_side and all(type(a.dimse) is StoreResponseDIMSE for a in server_side)


def test_storescu_statuses_unchanged(running_node: Any, tmp_path: Path) -> None:
    """dcmtk's storescu reads success for a good instance and 0xC000 for one without a Study Instance UID."""
    service = running_node()
    refused = make_image(generate_uid())
    del refused.StudyInstanceUID
    files = [
        write(make_image(generate_uid(), seed=3), tmp_path / "good"),
        write(refused, tmp_path / "refused"),
    ]
    result = _storescu(service.port, files, "-v")  # good first: storescu stops after a failure
    responses = [
        line for line in (result.stdout + result.stderr).splitlines() if "Received Store Response" in line
    ]
    assert responses == [
        "I: Received Store Response (Success)",
        "I: Received Store Response (Error: CannotUnderstand)",
    ]
