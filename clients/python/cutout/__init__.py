"""Cutout: background removal and face crops as a gRPC service.

The client library (`cutout.client`), the CLI (`cutout.cli`) and the
generated API (`cutout.v1`).
"""

from cutout.client import AsyncClient, Client
from cutout.errors import CutoutError

__all__ = ["AsyncClient", "Client", "CutoutError"]
