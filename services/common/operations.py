"""What kind of work an operation is and where a job waits: the one place that decides
the lane, and the priority range both the gateway and the scheduler check.

Light operations need no model: they run on a node's light executor, in the
scheduler's light lane, and never wait behind background removals.
"""

from __future__ import annotations

from enum import StrEnum

from cutout.v1 import jobs_pb2

# Submission.priority: 0 (the default) to MAX_PRIORITY, higher first.
MAX_PRIORITY = 9
PRIORITIES = range(MAX_PRIORITY + 1)
PRIORITY_RULE = f"must be 0-{MAX_PRIORITY}"


class Lane(StrEnum):
    """A job's lane. Its value is the prefix of the lane's Redis keys ('' or 'light:', so
    `queue:acme` and `light:queue:acme`), the job hash's `lane` field, and what Lua
    scripts get; being a str, it goes into keys and script arguments as it is."""

    HEAVY = ""  # inference: background removal, passport crops
    LIGHT = "light:"  # transforms, ID-card and square crops: no model

    @classmethod
    def of(cls, operation: jobs_pb2.Operation) -> Lane:
        kind = operation.WhichOneof("kind")
        if kind == "transform":
            return cls.LIGHT
        # Framing a face in the original photo needs only the face detector;
        # passport photos also need the background removed.
        if kind == "crop_face" and operation.crop_face.mode != jobs_pb2.FACE_CROP_MODE_PASSPORT:
            return cls.LIGHT
        return cls.HEAVY

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Lane:
        """The lane a job hash's `lane` field names (absent: HEAVY, as jobs before lanes)."""
        return cls(raw.decode() if isinstance(raw, bytes) else raw or "")

    @property
    def light(self) -> bool:
        return self is Lane.LIGHT

    @property
    def label(self) -> str:
        """'heavy' or 'light': for logs, metrics and messages."""
        return self.name.lower()


LANES = tuple(Lane)


def name(operation: jobs_pb2.Operation) -> str:
    """Short label for logs and metrics: remove_background, passport, id_card, square, transform."""
    kind = operation.WhichOneof("kind") or "none"
    if kind == "crop_face":
        mode = jobs_pb2.FaceCropMode.Name(operation.crop_face.mode)
        return mode.removeprefix("FACE_CROP_MODE_").lower()
    return kind
