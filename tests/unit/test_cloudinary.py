"""The Cloudinary result store: the real `cloudinary` SDK against a local stand-in (an HTTP
server in this process). Deliveries racing on Redis: tests/store/test_cloudinary.py; a
cluster uploading: tests/cluster/test_cloudinary.py."""

from __future__ import annotations

import hashlib
import io
import uuid

import pytest
from PIL import Image

from services.scheduler.cloudinary_store import (
    CloudinaryAccount,
    CloudinaryResultStore,
    public_id_from_url,
)
from services.scheduler.storage import StorageError
from tests.support.cloudinary_standin import CloudinaryStandIn


def png(color: tuple[int, int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (8, 8), color).save(out, "PNG")
    return out.getvalue()


async def test_signed_upload_lands_in_vendor_project_folder(standin: CloudinaryStandIn) -> None:
    store = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    job_id = uuid.uuid4().hex
    data = png((255, 0, 0, 255))
    url = await store.put(f"vendor-a/{job_id}.png", data, "image/png", folder="proj-7")

    # The stand-in accepted it only because the signature, key and timestamp checked out.
    [req] = standin.requests
    assert req.status == 200 and req.params["signature"]
    assert req.params["public_id"] == job_id and req.params["folder"] == "vendor-a/proj-7"
    asset = standin.assets[f"vendor-a/proj-7/{job_id}"]
    assert hashlib.sha256(asset.data).digest() == hashlib.sha256(data).digest()
    assert (
        url
        == f"https://res.cloudinary.com/cutout-test/image/upload/v1/vendor-a/proj-7/{job_id}.png"
    )
    assert public_id_from_url(url) == f"vendor-a/proj-7/{job_id}"


async def test_a_retried_upload_overwrites_instead_of_duplicating(
    standin: CloudinaryStandIn,
) -> None:
    store = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    job_id = uuid.uuid4().hex
    await store.put(f"vendor-a/{job_id}.png", png((1, 2, 3, 255)), "image/png", folder="p")
    second = png((9, 9, 9, 255))
    url = await store.put(f"vendor-a/{job_id}.png", second, "image/png", folder="p")
    assert list(standin.assets) == [f"vendor-a/p/{job_id}"]
    assert standin.assets[f"vendor-a/p/{job_id}"].data == second
    assert "/v2/" in url

    await store.delete(url)
    assert standin.assets == {}
    assert standin.requests[-1].action == "destroy" and standin.requests[-1].status == 200


async def test_a_wrong_secret_or_failing_service_is_a_storage_error(
    standin: CloudinaryStandIn,
) -> None:
    bad = CloudinaryAccount.from_url(standin.url.replace(standin.api_secret, "wrong"))
    with pytest.raises(StorageError, match="Invalid Signature"):
        await CloudinaryResultStore(bad).put(
            f"v/{uuid.uuid4().hex}.png", png((0,) * 4), "image/png"
        )

    standin.fail_next = 1
    good = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    with pytest.raises(StorageError, match="General Error"):
        await good.put(f"v/{uuid.uuid4().hex}.png", png((0,) * 4), "image/png")
    assert standin.assets == {}


def test_cloudinary_url_errors_never_echo_the_secret() -> None:
    for url in ("https://k:s3cret@cloud", "cloudinary://cloud", "cloudinary://k@cloud"):
        with pytest.raises(ValueError) as err:
            CloudinaryAccount.from_url(url)
        assert "s3cret" not in str(err.value)
    account = CloudinaryAccount.from_url("cloudinary://k:s3cret@cloud")
    assert "s3cret" not in repr(account)
