"""Picture bombs in containers (issue 26): small files that hold, or decode to, far more than their
header says. Each is refused, or decoded within its accounted cost, before memory grows: peak RSS of
a separate process that runs four at once, as a server would."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.preprocessing import ImageProcessor, ImageTooLarge, NotAnImage
from model.preprocessing.image import ACCEPTED_FORMATS, decode_cost, decoded_bytes, open_header
from tests.conftest import run_python_script

HUGE = 12_000  # 12000x12000: 144 Mpx, 576 MB as RGBA
LIMIT = 25_000_000  # the service's default IMM_MAX_IMAGE_PIXELS
MB = 1024 * 1024


# --- bomb builders: streamed, so the test itself never holds a huge picture -----------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_png(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A transparent-black RGBA PNG, compressed row by row."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 4 * width)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + extra_chunks
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


def ico(payload: bytes, kind: int = 1) -> bytes:
    """An icon (kind 1) or cursor (kind 2) whose one entry declares 256x256 and holds ``payload``."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(payload), 6 + 16)
    return struct.pack("<HHH", 0, kind, 1) + entry + payload


def icns(payload: bytes) -> bytes:
    """An Apple icon whose one 'ic10' entry (1024x1024) holds ``payload``."""
    body = b"ic10" + struct.pack(">I", 8 + len(payload)) + payload
    return b"icns" + struct.pack(">I", 8 + len(body)) + body


def _flat_lzw(pixels: int) -> bytes:
    """GIF LZW data for ``pixels`` pixels of colour 0: each code is one longer run than the last."""
    min_size = 8
    clear, end = 1 << min_size, (1 << min_size) + 1
    codes = [(clear, min_size + 1)]
    left = pixels
    while left:
        next_code, width, run = end + 1, min_size + 1, 1
        while left and next_code < 4095:
            length = min(run, left)
            codes.append((0 if length == 1 else end + length - 1, width))
            left -= length
            if run > 1:  # the decoder adds an entry for every code but a cycle's first
                next_code += 1
                if next_code == 1 << width and width < 12:
                    width += 1
            run += 1
        codes.append((clear, width))
    codes.append((end, min_size + 1))
    out, bits, count = bytearray(), 0, 0
    for code, width in codes:
        bits |= code << count
        count += width
        while count >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            count -= 8
    if count:
        out.append(bits)
    blocks = b"".join(bytes([len(out[i : i + 255])]) + out[i : i + 255] for i in range(0, len(out), 255))
    return bytes([min_size]) + blocks + b"\0"


def gif(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """An animated GIF: a ``screen``, then flat frames of the given sizes at (0, 0)."""
    palette = bytes(range(256)) * 3
    data = b"GIF89a" + struct.pack("<HHBBB", *screen, 0xF7, 0, 0) + palette
    data += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for width, height in frames:
        data += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # 100 ms a frame
        data += b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + _flat_lzw(width * height)
    return data + b";"


def tiff(pages: list[tuple[int, int]], tile: tuple[int, int] | None = None) -> bytes:
    """An 8-bit grey, deflated TIFF: one strip (or one ``tile``) of zeros a page."""
    out = bytearray(b"II*\0\0\0\0\0")
    link = 4
    for width, height in pages:
        block_width, block_height = tile or (width, height)
        compressor = zlib.compressobj(9)
        row = b"\0" * block_width
        data = b"".join(compressor.compress(row) for _ in range(block_height)) + compressor.flush()
        offset = len(out)
        out += data + b"\0" * (len(data) % 2)
        entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1)]
        if tile:
            entries += [(322, 4, block_width), (323, 4, block_height), (324, 4, offset), (325, 4, len(data))]
        else:
            entries += [(273, 4, offset), (278, 4, height), (279, 4, len(data))]
        struct.pack_into("<I", out, link, len(out))
        out += struct.pack("<H", len(entries))
        for tag, kind, value in sorted(entries):
            out += struct.pack("<HHI", tag, kind, 1) + struct.pack(
                "<HH" if kind == 3 else "<I", value, *[0][: kind == 3]
            )
        link = len(out)
        out += b"\0\0\0\0"
    return bytes(out)


def png_text_bomb() -> bytes:
    """A 16x16 PNG with 64 zTXt chunks of 1 MB each (1 KB compressed): 64 MB of text in its header."""
    text = zlib.compress(b"a" * (MB - 1), 9)
    chunks = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(64))
    return flat_png(16, 16, chunks)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


BOMBS = {
    # name: (builder, expected outcome of the processor)
    "ico_holding_a_huge_png": (lambda: ico(flat_png(HUGE, HUGE)), "NotAnImage"),
    "cur_holding_a_huge_png": (lambda: ico(flat_png(HUGE, HUGE), kind=2), "NotAnImage"),
    "icns_holding_a_huge_png": (lambda: icns(flat_png(HUGE, HUGE)), "NotAnImage"),
    "gif_first_frame_overflowing_its_screen": (lambda: gif((64, 64), [(HUGE, HUGE)]), "ImageTooLarge"),
    "gif_huge_second_frame": (lambda: gif((64, 64), [(64, 64), (HUGE, HUGE)]), [3, 224, 224]),
    "tiff_huge_second_page": (lambda: tiff([(64, 64), (HUGE, HUGE)]), [3, 224, 224]),
    "tiff_huge_tile": (lambda: tiff([(64, 64)], tile=(16384, 16384)), "ImageTooLarge"),
    "png_text_chunks": (png_text_bomb, "ImageTooLarge"),
    # Within the pixel limit but costlier than their pixels: the budget decodes them one at a time.
    "webp_2000_lossless": (
        lambda: encode(Image.new("RGB", (2000, 2000), (200, 30, 30)), "WEBP", lossless=True),
        [3, 224, 224],
    ),
    "jpeg_3000_progressive": (
        lambda: encode(
            Image.new("RGB", (3000, 3000), (200, 30, 30)), "JPEG", progressive=True, subsampling=0
        ),
        [3, 224, 224],
    ),
}

MEMORY_SCRIPT = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from model.preprocessing import ImageProcessor

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))

data = open(sys.argv[1], "rb").read()
processor = ImageProcessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), max_pixels=int(sys.argv[2]))
call = processor.header if sys.argv[3] == "header" else processor

def outcome(_):
    try:
        result = call(data)
    except Exception as error:
        return type(error).__name__
    return list(result.shape) if sys.argv[3] == "pixels" else "header"

with ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda _: None, range(4)))  # the threads exist before the baseline
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak resident set size, to the current one
    outcomes = list(pool.map(outcome, range(4)))
print(json.dumps({"growth": status("VmHWM") - before, "outcomes": outcomes}))
"""


def peak_growth(path: Path, stage: str) -> tuple[int, list]:
    """Peak RSS growth of a fresh process that runs four of ``path`` at once (``stage``: ``pixels``,
    the whole processor; ``header``, what a text-only model reads)."""
    result = run_python_script(MEMORY_SCRIPT, str(path), str(LIMIT), stage)
    return result["growth"], result["outcomes"]


@pytest.fixture(scope="module")
def bomb_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    files = {}
    for name, (build, _) in BOMBS.items():
        files[name] = folder / name
        files[name].write_bytes(build())
    return files


@pytest.mark.parametrize("name", list(BOMBS))
def test_four_bombs_at_once_cost_less_than_100_mb(bomb_files, name):
    path = bomb_files[name]
    assert path.stat().st_size < 600_000  # small files (the ICO: 560 KB)
    growth, outcomes = peak_growth(path, "pixels")
    assert outcomes == [BOMBS[name][1]] * 4
    print(f"{name}: {path.stat().st_size // 1024} KB, peak RSS +{growth / MB:.0f} MB")
    assert growth < 100 * MB, f"{name}: peak RSS grew by {growth / MB:.0f} MB"


@pytest.mark.parametrize("name", ["ico_holding_a_huge_png", "icns_holding_a_huge_png", "png_text_chunks"])
def test_a_text_only_model_reading_the_header_of_a_bomb_costs_nothing(bomb_files, name):
    """The issue's case: the default text-only server only reads the header (issue 26: 455 to
    997 MB for one ICO, 2,560 MB for four)."""
    growth, outcomes = peak_growth(bomb_files[name], "header")
    assert outcomes[0] in ("NotAnImage", "ImageTooLarge") and len(set(outcomes)) == 1
    assert growth < 50 * MB, f"{name}: peak RSS grew by {growth / MB:.0f} MB"


def test_refused_formats_are_named_with_the_accepted_ones(bomb_files):
    for name, fmt in [("ico_holding_a_huge_png", "ICO"), ("icns_holding_a_huge_png", "ICNS")]:
        with pytest.raises(NotAnImage, match=f"{fmt} pictures are not accepted: send JPEG, PNG, GIF, WebP"):
            open_header(bomb_files[name].read_bytes())
    with pytest.raises(NotAnImage, match="ICO pictures are not accepted"):
        open_header(bomb_files["ico_holding_a_huge_png"])  # a path: the same
    small_icon = encode(Image.new("RGBA", (32, 32)), "ICO")  # even a harmless one
    with pytest.raises(NotAnImage, match="ICO"):
        open_header(small_icon)
    # Formats Pillow knows but a tweet's picture never is (no signature to name): the usual 415.
    for fmt in ("PPM", "TGA", "PCX"):
        with pytest.raises(NotAnImage, match="not an image file"):
            open_header(encode(Image.new("RGB", (8, 8)), fmt))
    with pytest.raises(NotAnImage, match=r"^not an image file \(unsupported or unknown format\)$"):
        open_header(b"this is plain text, not a picture")


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_still_decodes(fmt):
    picture = Image.new("RGB", (300, 200), (10, 200, 30))
    processor = ImageProcessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert processor(encode(picture, fmt)).shape == (3, 224, 224)


def test_an_mpo_opens_as_its_first_picture_in_draft_mode():
    first, second = Image.new("RGB", (2000, 1600), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    image = open_header(data, draft_size=224)
    assert image.format == "MPO" and image.size == (500, 400)  # 1/4: the JPEG decoder's draft
    processor = ImageProcessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert processor(data)[0].mean() > 0.9  # red: the first picture


def test_decode_cost_counts_what_decoders_hold_beyond_the_pixels():
    flat = Image.new("RGB", (1000, 1000), (200, 30, 30))
    webp = open_header(encode(flat, "WEBP", lossless=True))
    assert decode_cost(webp) == 16 * 1000 * 1000  # four RGBA canvases
    baseline = open_header(encode(flat, "JPEG"), draft_size=224)
    assert decode_cost(baseline) == decoded_bytes(baseline) == 250 * 250 * 4  # drafted to 1/4
    progressive = open_header(encode(flat, "JPEG", progressive=True, subsampling=0), draft_size=224)
    assert decode_cost(progressive) == 250 * 250 * 4 + 2 * 3 * 1000 * 1000  # 2 bytes a sample, full size
    subsampled = open_header(encode(flat, "JPEG", progressive=True, subsampling=2), draft_size=224)
    assert decode_cost(subsampled) == 250 * 250 * 4 + 2 * (1008 * 1008 + 2 * 504 * 504)  # 4:2:0, whole MCUs
    one_strip = open_header(tiff([(1000, 1000)]))
    assert decode_cost(one_strip) == 2 * 1000 * 1000  # its pixels and libtiff's strip
    png = open_header(encode(flat, "PNG"))
    assert decode_cost(png) == decoded_bytes(png)


def test_a_jpeg_with_one_component_a_scan_counts_its_coefficients():
    """A sequential JPEG whose first scan holds fewer components than the frame is buffered whole by
    libjpeg, like a progressive one."""
    data = bytearray(encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG", subsampling=0))
    sos = data.index(b"\xff\xda")
    assert data[sos + 4] == 3
    data[sos + 4] = 1  # the scan header now claims one component (the data no longer matches)
    image = open_header(bytes(data))
    assert decode_cost(image) == decoded_bytes(image) + 2 * 3 * 64 * 64


def test_a_gif_frame_beyond_the_screen_is_the_size_checked():
    data = gif((64, 64), [(5000, 40)])
    assert open_header(data).size == (5000, 64)
    with pytest.raises(ImageTooLarge, match="5000x64"):
        open_header(data, max_pixels=100_000)


def test_only_the_first_page_or_frame_is_decoded():
    processor = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), max_pixels=10_000)
    # The later page or frame is over the limit, and is never read: the first decodes.
    assert processor(tiff([(64, 64), (1000, 1000)])).shape == (3, 32, 32)
    assert processor(gif((64, 64), [(64, 64), (1000, 1000)])).shape == (3, 32, 32)
    pixels = np.zeros((3, 32, 32), dtype=np.float32) - 1.0  # black, normalised
    assert np.allclose(processor(tiff([(64, 64), (1000, 1000)])), pixels)
