"""Preprocessing: golden values, every input kind and mode, and train/serve equivalence."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lcnet_runner.preprocess import (
    ImageTooLargeError,
    InvalidImageError,
    PreprocessConfig,
    center_crop_box,
    eval_crop,
    load_image,
    load_pixels,
    normalize,
    preprocess,
    resize_short,
    short_side_size,
)
from train.data import decode_split, eval_batches

CONFIG = PreprocessConfig(crop_size=32, resize_short=36)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 50, height: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 5 % 256, y * 6 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def photo(width: int, height: int) -> Image.Image:
    """Texture and edges, so every DCT coefficient and chroma sample matters."""
    noise = np.random.default_rng(width).integers(0, 60, (height, width, 3))
    return Image.fromarray((gradient(width, height) // 2 + noise).astype(np.uint8))


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_resize_short_and_center_crop_follow_paddlex_rounding() -> None:
    assert short_side_size(500, 375, 256) == (341, 256)
    assert short_side_size(375, 500, 256) == (256, 341)
    assert center_crop_box(341, 256, 224) == (58, 16, 282, 240)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_each_backend_resizes_as_its_library_does(interpolation: str) -> None:
    """Pixel-exact with PaddleX's own resize (funcs.resize: cv2.resize or PIL's resize)."""
    import cv2

    image = Image.fromarray(gradient(500, 375))
    flags = {"nearest": "INTER_NEAREST", "bilinear": "INTER_LINEAR",
             "bicubic": "INTER_CUBIC", "lanczos": "INTER_LANCZOS4"}  # fmt: skip
    cv2_flag = getattr(cv2, flags[interpolation])
    pil_filter = getattr(Image.Resampling, interpolation.upper())
    expected = {
        "cv2": cv2.resize(np.asarray(image), (341, 256), interpolation=cv2_flag),
        "pil": np.asarray(image.resize((341, 256), pil_filter)),
    }
    for backend, pixels in expected.items():
        config = PreprocessConfig(resize_short=256, interpolation=interpolation, backend=backend)
        np.testing.assert_array_equal(resize_short(image, config), pixels)
    assert not np.array_equal(expected["cv2"], expected["pil"]) or interpolation == "nearest"


def test_preprocess_output_shape_dtype_and_golden_normalization() -> None:
    crop = preprocess(gradient(), CONFIG)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    batch = normalize(crop[None], CONFIG)
    assert batch.shape == (1, 3, 32, 32) and batch.dtype == np.float32
    naive = (crop.astype(np.float64) / 255 - CONFIG.mean) / CONFIG.std
    np.testing.assert_allclose(batch[0], naive.transpose(2, 0, 1), atol=1e-5)
    white = normalize(np.full((1, 1, 1, 3), 255, np.uint8), CONFIG)[0, :, 0, 0]
    np.testing.assert_allclose(white, [2.2489, 2.4286, 2.64], atol=1e-4)


def test_every_input_kind_gives_the_same_crop(tmp_path: Path) -> None:
    rgb = gradient()
    png = encode(Image.fromarray(rgb))
    (tmp_path / "a.png").write_bytes(png)
    expected = preprocess(rgb, CONFIG)
    for source in (png, tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb)):
        np.testing.assert_array_equal(preprocess(source, CONFIG), expected)
    np.testing.assert_array_equal(preprocess(rgb[:, :, ::-1].copy(), CONFIG, bgr=True), expected)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = Image.fromarray(gradient()).convert("RGBA" if mode in ("LA", "RGBA") else "RGB")
    if mode in ("I;16", "I"):
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257).convert(mode)
    else:
        image = image.convert(mode)
    decoded = load_image(encode(image, "TIFF" if mode in ("CMYK", "I") else "PNG"))
    assert decoded.mode == "RGB" and decoded.size == (50, 40)
    if mode.startswith("I"):  # 16-bit is scaled down, not clipped to white
        assert 0 < np.asarray(decoded).mean() < 250


@pytest.mark.parametrize(
    "pixels, container, expected",
    [
        (np.full((8, 8), 250, np.uint16), "PNG", 1),  # a dark 16-bit image stays dark (it was 250)
        (np.full((8, 8), 256, np.uint16), "PNG", 1),  # and one level brighter alike (it was 1)
        (np.full((8, 8), 65535, np.uint16), "PNG", 255),
        (np.full((8, 8), 0.5, np.float32), "TIFF", 128),  # a float image in 0..1 (it was black)
        (np.full((8, 8), 200.0, np.float32), "TIFF", 200),  # what Pillow makes of 8-bit as F
    ],
)
def test_greyscale_beyond_8_bits_is_scaled_by_its_range(
    pixels: np.ndarray, container: str, expected: int
) -> None:
    decoded = np.asarray(load_image(encode(Image.fromarray(pixels), container)))
    assert decoded.min() == decoded.max() == expected


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(load_image(encode(clear)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    image = Image.fromarray(gradient(60, 30))
    decoded = load_image(encode(image, "JPEG", exif=orientation(6)))  # "rotate 90° clockwise"
    assert decoded.size == (30, 60)


JPEGS = {
    "4:2:0": (photo(451, 300), {}),
    "4:4:4 q95": (photo(451, 300), {"subsampling": 0, "quality": 95}),
    "4:2:2 q50": (photo(333, 257), {"subsampling": 1, "quality": 50}),
    "progressive": (photo(300, 451), {"progressive": True}),
    "greyscale": (photo(300, 200).convert("L"), {}),
    "drafted to 1/4": (photo(1100, 1030), {}),
    **{f"orientation {v}": (photo(61, 37), {"exif": orientation(v)}) for v in range(1, 9)},
}


@pytest.fixture
def libjpeg_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each of preprocess's simplejpeg.decode_jpeg calls ended in: "pixels" or "raised"."""
    import simplejpeg

    calls, decode = [], simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        try:
            pixels = decode(*args, **kwargs)
        except ValueError:
            calls.append("raised")
            raise
        calls.append("pixels")
        return pixels

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    return calls


@pytest.mark.parametrize("name", JPEGS)
def test_jpegs_decode_straight_to_pillows_pixels(
    name: str, libjpeg_calls: list[str], tmp_path: Path
) -> None:
    """libjpeg-turbo's direct decode gives Pillow's pixels: chroma subsampling, progressive,
    greyscale, DCT-scaled drafts and every EXIF orientation, from bytes or a file."""
    image, options = JPEGS[name]
    data = encode(image, "JPEG", **options)
    (tmp_path / "a.jpg").write_bytes(data)
    expected = np.asarray(load_image(data, short_side=256))
    pixels = load_pixels(data, short_side=256)
    np.testing.assert_array_equal(load_pixels(tmp_path / "a.jpg", short_side=256), expected)
    assert libjpeg_calls == ["pixels", "pixels"]
    assert pixels.flags.c_contiguous and pixels.shape[2] == 3
    np.testing.assert_array_equal(pixels, expected)
    if name == "drafted to 1/4":
        assert pixels.shape == (258, 275, 3)


def test_jpegs_libjpeg_warns_about_are_pillows_to_judge(libjpeg_calls: list[str]) -> None:
    """Where libjpeg only warns, Pillow decides, as it always has: bytes after the last scan
    are accepted with Pillow's pixels, a cut-off file is refused, CMYK is Pillow's alone."""
    data = encode(photo(64, 48), "JPEG")
    padded = data[:-2] + b"\x00" * 7 + data[-2:]  # "extraneous bytes before marker 0xd9"
    np.testing.assert_array_equal(load_pixels(padded), np.asarray(load_image(padded)))
    with pytest.raises(InvalidImageError, match="truncated"):
        load_pixels(data[: len(data) // 2])
    assert libjpeg_calls == ["raised", "raised"]
    cmyk = encode(photo(64, 48).convert("CMYK"), "JPEG")
    np.testing.assert_array_equal(load_pixels(cmyk), np.asarray(load_image(cmyk)))
    assert libjpeg_calls == ["raised", "raised"]


def test_pil_images_not_yet_decoded_take_the_same_route(libjpeg_calls: list[str]) -> None:
    """A JPEG opened but not decoded (``Image.open``; what BentoML hands a ``PIL.Image``
    argument) decodes straight to Pillow's pixels too; a decoded one, or one drafted to
    greyscale, is Pillow's to decode; a cut-off one is an InvalidImageError, not an OSError."""
    data = encode(photo(451, 300), "JPEG", exif=orientation(6))
    expected = np.asarray(load_image(data))
    np.testing.assert_array_equal(load_pixels(Image.open(io.BytesIO(data))), expected)
    assert libjpeg_calls == ["pixels"]
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    np.testing.assert_array_equal(load_pixels(decoded), expected)
    drafted = [Image.open(io.BytesIO(data)) for _ in range(2)]
    for image in drafted:
        image.draft("L", image.size)
    grey = load_pixels(drafted[0])
    assert (grey[..., 0] == grey[..., 2]).all()
    np.testing.assert_array_equal(grey, np.asarray(load_image(drafted[1])))
    assert libjpeg_calls == ["pixels"]
    with pytest.raises(InvalidImageError, match="cannot decode image"):
        load_pixels(Image.open(io.BytesIO(data[: len(data) // 2])))


@pytest.mark.parametrize(
    "data", [b"", b"not an image", encode(Image.new("RGB", (64, 64)), "JPEG")[:100]]
)
def test_undecodable_bytes_raise_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        load_image(data)


def test_the_pixel_limit_is_checked_from_the_header_for_files_and_pil_images(
    tmp_path: Path,
) -> None:
    data = encode(photo(100, 60), "JPEG")
    for source in (data, Image.open(io.BytesIO(data))):
        with pytest.raises(ImageTooLargeError, match="100x60 pixels, more than the limit of 5999"):
            preprocess(source, CONFIG, max_pixels=5999)
        assert preprocess(source, CONFIG, max_pixels=6000).shape == (32, 32, 3)
    (path := tmp_path / "big.jpg").write_bytes(data)  # a file is named, as for its other errors
    with pytest.raises(ImageTooLargeError, match=f"^{path}: image is 100x60 pixels"):
        preprocess(path, CONFIG, max_pixels=5999)


def test_an_image_past_pillows_own_limit_names_the_limit_that_holds(tmp_path: Path) -> None:
    """Pillow refuses over twice its MAX_IMAGE_PIXELS before we see the header: the message
    said "could be decompression bomb DOS attack" with Pillow's figure, not the server's."""
    header = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(header, "PNG")  # 400 million pixels, a few hundred KB
    with pytest.raises(ImageTooLargeError) as refused:
        preprocess(header.getvalue(), CONFIG, max_pixels=40_000_000)
    assert str(refused.value) == "image has 400000000 pixels, more than the limit of 40000000"
    pillows = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match=f"more than the limit of {pillows}$"):
        preprocess(header.getvalue(), CONFIG, max_pixels=10**9)  # Pillow's is lower here
    (path := tmp_path / "bomb.png").write_bytes(header.getvalue())
    with pytest.raises(ImageTooLargeError, match=f"^{path}: image has 400000000 pixels"):
        preprocess(path, CONFIG)


def test_arrays_must_be_hwc_uint8() -> None:
    with pytest.raises(InvalidImageError, match="HxWx3 uint8"):
        load_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(InvalidImageError):
        load_image(np.zeros((4, 4, 3), np.float32))
    # no pixels: an InvalidImageError (a 4xx when served), not a ZeroDivisionError in the resize
    with pytest.raises(InvalidImageError, match="with pixels"):
        preprocess(np.zeros((0, 5, 3), np.uint8), CONFIG)
    with pytest.raises(InvalidImageError, match="0x4 pixels: nothing to classify"):
        preprocess(Image.new("RGB", (0, 4)), CONFIG)


def test_config_rejects_crop_larger_than_resize_and_unknown_backends() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        PreprocessConfig(crop_size=64, resize_short=32)
    with pytest.raises(ValueError, match="backend must be one of cv2, pil"):
        PreprocessConfig(backend="skimage")


def test_training_evaluation_crops_equal_serving_crops(tmp_path: Path) -> None:
    """Training validates on exactly the pixels the Predictor and server will see."""
    paths = []
    for i, (w, h) in enumerate([(50, 40), (40, 90), (37, 37)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(gradient(w, h)).save(path, quality=90)
        paths.append((path, i))
    split = decode_split(paths, CONFIG, workers=2)
    crops, labels = next(eval_batches(split, CONFIG.crop_size, batch_size=8))
    assert labels.tolist() == [0, 1, 2]
    for crop, (path, _) in zip(crops, paths, strict=True):
        np.testing.assert_array_equal(crop, preprocess(path, CONFIG))


def test_large_jpegs_decode_at_reduced_scale_with_nearly_the_same_crop() -> None:
    photo = Image.fromarray(gradient(2000, 1500)).filter(ImageFilter.GaussianBlur(3))
    data = encode(photo, "JPEG", quality=90)
    config = PreprocessConfig(crop_size=224, resize_short=256)
    assert load_image(data, short_side=256).size == (500, 375)  # 1/4 scale, short side >= 256
    assert load_image(encode(Image.fromarray(gradient()), "JPEG"), short_side=256).size == (50, 40)
    full = eval_crop(load_image(data), config).astype(np.int16)
    drafted = preprocess(data, config).astype(np.int16)
    assert drafted.shape == full.shape == (224, 224, 3)
    assert np.abs(drafted - full).mean() < 3


def test_a_large_jpeg_opened_by_pil_is_drafted_like_its_file(tmp_path: Path) -> None:
    """Image.open(path) (what BentoML hands a PIL.Image argument) decodes at the same reduced
    DCT scale as the path, its bytes and training, and the caller's image keeps its size."""
    path = tmp_path / "big.jpg"
    photo(1600, 1200).save(path, quality=90)
    config = PreprocessConfig(crop_size=224, resize_short=256)
    expected = preprocess(path, config)
    np.testing.assert_array_equal(preprocess(path.read_bytes(), config), expected)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(preprocess(opened, config), expected)
        assert opened.size == (1600, 1200)
    with Image.open(path) as opened:
        assert load_image(opened, short_side=256).size == load_image(path, short_side=256).size


@pytest.mark.parametrize("backend", ["cv2", "pil"])
@pytest.mark.parametrize("interpolation", ["bilinear", "lanczos"])
def test_inference_yml_records_the_backend_in_paddlex_terms(
    tmp_path: Path, backend: str, interpolation: str
) -> None:
    """What we write, PaddleX accepts (it rejects the other backend's names) and we read back."""
    import yaml

    from lcnet_runner.artifact import preprocess_from_inference_yml, write_metadata

    config = PreprocessConfig(interpolation=interpolation, backend=backend)
    write_metadata(tmp_path, architecture="PPLCNet_x0_25", labels=["a", "b"], preprocess=config,
                   info={})  # fmt: skip
    written = yaml.safe_load((tmp_path / "inference.yml").read_text())
    resize = written["PreProcess"]["transform_ops"][0]["ResizeImage"]
    assert resize["backend"] == backend
    assert preprocess_from_inference_yml(written) == config
    paddlex = pytest.importorskip("paddlex.inference.models.common.vision.processors")
    paddlex.ResizeByShort(256, interp=resize["interpolation"], backend=backend)
    del resize["backend"]  # a PaddleX folder that does not say: PaddleX resizes with OpenCV
    assert preprocess_from_inference_yml(written).backend == "cv2"
