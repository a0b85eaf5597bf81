"""Input images as users have them: sources, modes, orientation, fitting, and every bad-input class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import ImageError, fit_image, load_image


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 5
    arr[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 7
    return Image.fromarray(arr)


# ---- sources -------------------------------------------------------------------------------


def test_sources_path_bytes_fileobj_pil_uri_give_same_pixels(tmp_path: Path) -> None:
    img = _rgb()
    data = _png_bytes(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    expected = np.asarray(img)

    import fsspec

    with fsspec.open("memory://vcut-test/a.png", "wb") as fh:
        fh.write(data)
    sources = {
        "path str": str(path),
        "Path": path,
        "file uri": f"file://{path}",
        "bytes": data,
        "bytearray": bytearray(data),
        "file object": io.BytesIO(data),
        "PIL": img,
        "fsspec uri": "memory://vcut-test/a.png",
    }
    for name, src in sources.items():
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected), name
    fs = fsspec.filesystem("memory")
    assert np.array_equal(np.asarray(load_image("/vcut-test/a.png", filesystem=fs)), expected)


# ---- orientation and modes -----------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    img = _rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = load_image(_png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (30, 40)


@pytest.mark.parametrize(
    "mode",
    ["L", "1", "P", "CMYK", "LA", "I", "YCbCr"],
)
def test_modes_become_rgb(mode: str) -> None:
    src = _rgb().convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "YCbCr") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    out = load_image(_png_bytes(src, fmt))
    assert out.mode == "RGB" and out.size == src.size


def test_rgba_is_composited_on_white_by_default_and_on_given_background() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red, fully transparent on the left half
    arr[:, 2:, 3] = 255
    src = Image.fromarray(arr, "RGBA")
    out = np.asarray(load_image(_png_bytes(src)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 3]) == (255, 0, 0)
    out = np.asarray(load_image(src, background=(0, 0, 255)))
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_palette_with_transparency_is_composited() -> None:
    src = Image.new("P", (4, 4), 0)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    src.putpixel((3, 3), 1)
    src.info["transparency"] = 0
    out = np.asarray(load_image(_png_bytes(src, transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[3, 3]) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt: str) -> None:
    arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    out = np.asarray(load_image(_png_bytes(Image.fromarray(arr), fmt)))
    assert out[0, :, 0].tolist() == [0, 128, 255]


# ---- fitting -------------------------------------------------------------------------------


def test_fit_crop_and_letterbox() -> None:
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    crop = fit_image(img, 64, 64)
    assert crop.size == (64, 64) and np.asarray(crop).min() == 255
    box = np.asarray(fit_image(img, 64, 64, "letterbox"))
    assert box.shape == (64, 64, 3)
    assert box[0, 32].tolist() == [0, 0, 0] and box[32, 32].tolist() == [255, 255, 255]
    assert fit_image(img, 200, 100) is img
    with pytest.raises(ValueError, match="fit mode"):
        fit_image(img, 64, 64, "stretch")


# ---- bad inputs: one exception type, a message naming the input and the problem --------------


def test_bad_inputs_raise_image_error_naming_input_and_problem(tmp_path: Path) -> None:
    good = _png_bytes(_rgb(64, 64))
    cases: dict[str, tuple[object, str]] = {}

    missing = tmp_path / "missing.png"
    cases["missing"] = (missing, "not found")
    cases["directory"] = (tmp_path, "directory")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases["zero-byte"] = (empty, "empty")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    cases["truncated"] = (truncated, "truncated")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 10)
    cases["non-image"] = (text, "not a recognised image")
    cases["remote missing"] = ("memory://vcut-test/nope.png", "not found")

    for label, (src, problem) in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(src)
        msg = str(info.value)
        assert problem in msg, (label, msg)
        assert Path(str(src)).name in msg or str(src) in msg, (label, msg)

    big = tmp_path / "big.png"
    big.write_bytes(_png_bytes(Image.new("L", (4000, 3000))))
    with pytest.raises(ImageError, match=r"big\.png.*too large.*12000000 pixels"):
        load_image(big, max_pixels=10_000_000)
    with pytest.raises(ImageError, match="too large.*max_bytes"):
        load_image(big, max_bytes=100)
    with pytest.raises(ImageError, match="too large"):
        load_image(Image.new("L", (100, 100)), max_pixels=5000)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="unsupported source type"):
        load_image(12345)  # type: ignore[arg-type]


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    data = _png_bytes(_rgb(64, 64), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) - 200])


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    """A PNG whose header claims 30000x30000 pixels (900 M) is refused from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b""))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb, max_pixels=10**12)  # Pillow's own guard still applies
