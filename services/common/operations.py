"""What kind of work an operation is: the one place that decides the lane.

Light operations need no model: they run on a node's light executor, in the
scheduler's light lane, and never wait behind background removals.
"""

from __future__ import annotations

from cutout.v1 import jobs_pb2

LIGHT_LANE = "light:"
HEAVY_LANE = ""
LANES = (HEAVY_LANE, LIGHT_LANE)


def is_light(operation: jobs_pb2.Operation) -> bool:
    kind = operation.WhichOneof("kind")
    if kind == "transform":
        return True
    # Framing a face in the original photo needs only the face detector;
    # passport photos also need the background removed.
    return kind == "crop_face" and operation.crop_face.mode != jobs_pb2.FACE_CROP_MODE_PASSPORT


def lane(operation: jobs_pb2.Operation) -> str:
    return LIGHT_LANE if is_light(operation) else HEAVY_LANE


def name(operation: jobs_pb2.Operation) -> str:
    """Short label for logs and metrics: remove_background, passport, id_card, square, transform."""
    kind = operation.WhichOneof("kind") or "none"
    if kind == "crop_face":
        mode = jobs_pb2.FaceCropMode.Name(operation.crop_face.mode)
        return mode.removeprefix("FACE_CROP_MODE_").lower()
    return kind
