"""A study's short key: the first 8 hex digits of SHA-256 of its StudyInstanceUID.

Short enough to read aloud, says nothing about the patient, and the same in the
demo's summary and preview names, ``gvr audit`` and the review page, so one study
can be followed across all of them.
"""

from __future__ import annotations

import hashlib
import re

KEY_LENGTH = 8
_KEY = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")


def study_key(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode()).hexdigest()[:KEY_LENGTH]


def looks_like_key(text: str) -> bool:
    return bool(_KEY.match(text))
