"""The shared preprocessing: images of any mode and size, text with its word alignment."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from model.config import PreprocessingConfig
from model.preprocessing import (
    CorruptImage,
    ImageProcessor,
    ImageTooLarge,
    NotAnImage,
    Preprocessor,
    add_entity_markers,
    load_tokenizer,
    open_image,
)
from tests.conftest import jpeg_bytes, minilm_path, run_python_script

CONFIG = PreprocessingConfig()
PROCESSOR = ImageProcessor(CONFIG.image_size, CONFIG.image_mean, CONFIG.image_std)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def half_red_half_blue(width=200, height=100) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: half_red_half_blue(), "JPEG"),
        (lambda: half_red_half_blue().convert("L"), "PNG"),
        (lambda: half_red_half_blue().convert("RGBA"), "PNG"),
        (lambda: half_red_half_blue().convert("P"), "GIF"),
        (lambda: half_red_half_blue().convert("CMYK"), "JPEG"),
        (lambda: half_red_half_blue().convert("LA"), "PNG"),
        (lambda: Image.fromarray(np.full((50, 60), 40000, dtype=np.uint16)), "PNG"),
        (lambda: half_red_half_blue(), "WEBP"),
    ],
)
def test_any_mode_becomes_normalised_chw(make, fmt):
    pixels = PROCESSOR(encode(make(), fmt))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()


def test_normalisation_uses_the_configured_statistics():
    white = encode(Image.new("RGB", (64, 64), (255, 255, 255)), "PNG")
    expected = (1.0 - np.array(CONFIG.image_mean)) / np.array(CONFIG.image_std)
    assert np.allclose(PROCESSOR(white)[:, 10, 10], expected, atol=1e-5)


def test_normalisation_table_equals_the_float_arithmetic():
    """Every 8-bit level of every channel, bit for bit: (level / 255 - mean) / std in float32."""
    levels = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(
        np.stack([levels, levels[::-1], np.roll(levels, 7)], axis=-1)[None].repeat(256, 0)
    )
    pixels = np.asarray(image).astype(np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(CONFIG.image_mean, dtype=np.float32)
    std = np.asarray(CONFIG.image_std, dtype=np.float32)
    expected = ((pixels - mean) / std).transpose(2, 0, 1)
    processor = ImageProcessor(256, CONFIG.image_mean, CONFIG.image_std)  # 256x256: no resampling
    assert np.array_equal(processor.to_array(image), expected)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert open_image(encode(clear, "PNG")).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    data = encode(half_red_half_blue(), "JPEG", exif=exif)
    upright = open_image(data)
    assert upright.size == (100, 200)
    top, bottom = np.asarray(upright)[10, 50], np.asarray(upright)[190, 50]
    assert top[0] > 200 and top[2] < 60  # red (the left half) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_large_jpeg_is_decoded_in_draft_mode():
    photo = jpeg_bytes(width=4000, height=3000)
    decoded = open_image(photo, draft_size=224)
    assert decoded.size == (500, 375)  # the decoder scaled by 1/8, still >= 224
    assert open_image(photo).size == (4000, 3000)
    assert PROCESSOR(photo).shape == (3, 224, 224)


def test_bad_images_raise_typed_errors():
    with pytest.raises(NotAnImage):
        PROCESSOR(b"this is plain text, not a picture")
    with pytest.raises(CorruptImage):
        PROCESSOR(jpeg_bytes()[:1500])
    small = ImageProcessor(224, CONFIG.image_mean, CONFIG.image_std, max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="320x240"):
        small(jpeg_bytes())


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")  # tiny file, 400 Mpx
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge):
        PROCESSOR(bomb)


@pytest.fixture(scope="module")
def preprocessor():
    return Preprocessor(CONFIG, load_tokenizer(minilm_path() / "tokenizer.json"))


def test_word_index_points_at_first_sub_tokens(preprocessor):
    words = ["Unbelievable", "#GoBulls", "in", "Chicago", "!"]
    encoded = preprocessor.text.encode(words)
    tokenizer = preprocessor.text.tokenizer
    assert encoded.input_ids[0] == tokenizer.token_to_id("[CLS]")
    assert encoded.input_ids[-1] == tokenizer.token_to_id("[SEP]")
    assert encoded.num_words == 5 and not encoded.truncated
    for word, position in zip(words, encoded.word_index):
        first_piece = tokenizer.encode(word, add_special_tokens=False).ids[0]
        assert encoded.input_ids[position] == first_piece


def test_truncation_keeps_whole_words(preprocessor):
    short = Preprocessor(PreprocessingConfig(max_seq_len=8), preprocessor.text.tokenizer)
    words = ["hello", "unbelievably", "world", "again", "and", "again"]
    encoded = short.text.encode(words)
    assert len(encoded.input_ids) <= 8 and encoded.truncated
    pieces = sum(
        len(short.text.tokenizer.encode(w, add_special_tokens=False).ids) for w in words[: encoded.num_words]
    )
    assert len(encoded.input_ids) == pieces + 2


def test_words_the_normaliser_erases_still_get_a_position(preprocessor):
    encoded = preprocessor.text.encode(["hello", "\u200b", "world"])
    assert encoded.num_words == 3
    assert encoded.input_ids[encoded.word_index[1]] == preprocessor.text.tokenizer.token_to_id("[UNK]")


def test_relation_markers_wrap_the_entities(preprocessor):
    tokenizer = load_tokenizer(minilm_path() / "tokenizer.json")
    assert add_entity_markers(tokenizer, CONFIG.entity_markers) == 4
    relation = Preprocessor(CONFIG, tokenizer).text
    words = ["Deion", "Jones", "and", "Kwon", "Alexander"]
    encoded = relation.encode_relation(words, head=(0, 2), tail=(3, 5))
    tokens = [tokenizer.id_to_token(i) for i in encoded.input_ids]
    assert tokens[encoded.marker_index[0]] == "<s>" and tokens[encoded.marker_index[1]] == "<o>"
    assert tokens.index("</s>") < tokens.index("and") < tokens.index("<o>")
    assert tokens[-2:] == ["</o>", "[SEP]"]
    # adjacent spans: the head's closing marker comes before the tail's opening one
    adjacent = relation.encode_relation(words, head=(0, 2), tail=(2, 3))
    tokens = [tokenizer.id_to_token(i) for i in adjacent.input_ids]
    assert tokens.index("</s>") < tokens.index("<o>")


def test_collate_pads_and_flags_images(preprocessor):
    texts = [preprocessor.text.encode(["a", "b", "c"]), preprocessor.text.encode(["d"])]
    pixels = np.ones((3, 224, 224), dtype=np.float32)
    batch = preprocessor.collate(texts, [None, pixels])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["word_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["has_image"].tolist() == [False, True]
    assert batch["pixel_values"].shape == (1, 3, 224, 224)  # only the pictures there are
    assert batch["pixel_values"][0].sum() == pixels.sum()
    assert preprocessor.collate(texts, [None, None])["pixel_values"].shape == (0, 3, 224, 224)
    assert "marker_index" not in batch


def test_preprocessing_does_not_import_torch():
    import subprocess

    code = "import model.preprocessing, model.decoding, model.config, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- memory: small files that decode huge ----------------------------------------------------------

MEMORY_SCRIPT = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from model.preprocessing import ImageProcessor

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))

data = open(sys.argv[1], "rb").read()
processor = ImageProcessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), max_pixels=25_000_000)
with ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda _: None, range(4)))  # the threads exist before the baseline
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak resident set size, to the current one
    shapes = [p.shape for p in pool.map(processor, [data] * 4)]
print(json.dumps({"growth": status("VmHWM") - before, "shapes": shapes}))
"""


def test_four_small_files_that_decode_huge_cost_less_than_100_mb_at_once(tmp_path):
    """A 60 KB 16-bit 4999x4999 PNG decodes to 50 MB: four at once must not cost four full-size
    float copies (they took a server from 750 MB to 1.6 GB). Peak RSS of a separate process."""

    path = tmp_path / "grey16.png"
    Image.new("I;16", (4999, 4999), 40000).save(path)
    assert path.stat().st_size < 100_000
    result = run_python_script(MEMORY_SCRIPT, str(path))
    assert result["shapes"] == [[3, 224, 224]] * 4
    assert result["growth"] < 100 * 1024 * 1024, f"peak RSS grew by {result['growth'] / 2**20:.0f} MB"


@pytest.mark.parametrize("mode", ["I;16", "P", "RGBA", "LA", "L", "CMYK"])
def test_large_pictures_that_change_mode_are_converted_in_stripes_to_the_same_pixels(mode):
    """The reduced picture equals converting the whole picture, then reducing it (box filter)."""
    from model.preprocessing.image import decode, open_header, to_rgb

    rng = np.random.default_rng(0)
    width, height = 1000, 701  # not a multiple of the factor or of the stripe height
    if mode == "I;16":
        picture = Image.fromarray(rng.integers(0, 3000, (height, width), dtype=np.uint16))
    else:
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    data = encode(picture, "TIFF" if mode == "CMYK" else "PNG")
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    factor = min(decoded.size) // 224
    expected = to_rgb(decoded).reduce(factor)
    reduced = decode(open_header(data, draft_size=224), 224)
    assert reduced.size == expected.size and reduced.size[1] >= 224
    assert np.array_equal(np.asarray(reduced), np.asarray(expected))


def test_exif_orientation_is_applied_to_a_reduced_picture():
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    data = encode(half_red_half_blue(1000, 500).convert("P"), "PNG", exif=exif)
    upright = open_image(data, draft_size=224)
    assert upright.size == (250, 500)  # reduced by 2, then turned
    top, bottom = np.asarray(upright)[10, 125], np.asarray(upright)[490, 125]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
