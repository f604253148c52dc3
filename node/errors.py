"""Conditions callers branch on, each mapped to a named DIMSE status where it reaches a peer."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """Storage service C-STORE statuses (PS3.4 B.2.3) the SCP answers with."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # In the "cannot understand" range (0xC000-0xCFFF), so senders do not retry it as they may an
    # out-of-resources 0xA7xx: an instance over a resource limit (node.limits) fails the same way again.
    EXCEEDS_RESOURCE_LIMIT = 0xC001
    # General failure: "processing failure" (PS3.7 C.4)
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122


class InstanceRejectedError(ValueError):
    """A received data set the node will not keep; carries the status to answer."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class LimitExceededError(InstanceRejectedError):
    """An instance claims more than a resource limit allows; refused with EXCEEDS_RESOURCE_LIMIT (0xC001)."""

    def __init__(self, reason: str) -> None:
        super().__init__(StoreStatus.EXCEEDS_RESOURCE_LIMIT, reason)
