"""Image fetches with limits (``pipeline.fetch``) against real loopback servers that misbehave:
each fails its own image with one line, in bounded time, and a good server still serves."""

from __future__ import annotations

import pytest
from hostile_http import hostile_server, png_bytes

from pipeline.errors import ImageError
from pipeline.fetch import FetchLimits
from pipeline.images import load_image

LIMITS = FetchLimits(connect_timeout_s=1.0, read_timeout_s=1.5, max_bytes=2**20)


@pytest.mark.parametrize("kind", ["hang", "trickle"])
def test_a_host_that_never_finishes_is_a_timeout(kind):
    with hostile_server(kind) as url:
        with pytest.raises(ImageError) as info:
            load_image(url, limits=LIMITS)
    message = str(info.value)
    assert message.startswith(f"image '{url}' cannot be read: unreachable (timeout after "), message
    assert "\n" not in message
    seconds = float(message.split("timeout after ")[1].split(" s")[0])
    # bounded by the budget (connect + read) plus one chunk of slack, never minutes
    assert LIMITS.read_timeout_s - 0.5 <= seconds <= LIMITS.budget_s + 2.0, message


def test_an_endless_body_is_cut_at_max_bytes():
    with hostile_server("endless") as url:
        with pytest.raises(ImageError) as info:
            load_image(url, limits=LIMITS)
    assert str(info.value) == (
        f"image '{url}' is too large (over {LIMITS.max_bytes} bytes; max_bytes={LIMITS.max_bytes})"
    )


def test_a_good_host_serves_the_whole_image_through_the_limits():
    with hostile_server("good") as url:
        img = load_image(url, limits=LIMITS)
    assert img.size == (16, 16) and img.mode == "RGB"
    assert len(png_bytes()) < LIMITS.max_bytes


def test_limits_reach_the_http_and_s3_filesystems():
    options = LIMITS.storage_options("https")["client_kwargs"]["timeout"]
    assert (options.sock_connect, options.sock_read, options.total) == (1.0, 1.5, 2.5)
    assert LIMITS.storage_options("s3") == {"config_kwargs": {"connect_timeout": 1.0, "read_timeout": 1.5}}
    assert LIMITS.storage_options("gs") == {}


def test_an_s3_image_through_the_limits(monkeypatch):
    """botocore's connect/read timeouts reach s3fs (moto on loopback); the size cap applies."""
    from conftest import moto_s3

    with moto_s3(monkeypatch) as fs:
        fs.mkdir("bucket")
        fs.pipe_file("bucket/a.png", png_bytes())
        assert load_image("s3://bucket/a.png", limits=LIMITS).size == (16, 16)
        small = FetchLimits(connect_timeout_s=1.0, read_timeout_s=1.5, max_bytes=100)
        with pytest.raises(ImageError, match=r"^image 's3://bucket/a.png' is too large \(over 100 bytes"):
            load_image("s3://bucket/a.png", limits=small)
        with pytest.raises(ImageError, match=r"^image 's3://bucket/missing.png' not found$"):
            load_image("s3://bucket/missing.png", limits=LIMITS)
