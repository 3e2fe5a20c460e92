"""Draw the top prediction on an image, as the seed did with ``cv2.putText`` — with Pillow."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .predictor import Prediction


def annotate(image: Image.Image, predictions: list[Prediction]) -> Image.Image:
    """A copy of ``image`` with "category: score" of the best prediction on a dark band."""
    out = image.convert("RGB")
    best = predictions[0]
    text = f"{best['category']}: {best['score']:.3f}"
    size = max(12, round(min(out.size) / 12))  # readable on thumbnails and on photos
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(out)
    margin = max(2, size // 4)
    left, top, right, bottom = draw.textbbox((margin, margin), text, font=font)
    draw.rectangle((0, 0, right + margin, bottom + margin), fill=(0, 0, 0))
    draw.text((margin, margin), text, font=font, fill=(255, 64, 64))
    return out
