"""Draw a scene with PIL: each object centred in its column, size class by radius."""

from __future__ import annotations

from PIL import Image, ImageDraw

from mmke.data.miniworld.scene import Rendering, Scene
from mmke.data.miniworld.vocab import COLOURS, COLUMNS

# Radius of a shape as a fraction of the image side, by size class (apart enough that the
# rendering scale jitter of +-15% never makes a small object look big).
RADIUS_FRACTION = {"small": 0.085, "big": 0.14}


def render(scene: Scene, rendering: Rendering, image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), rendering.background)
    draw = ImageDraw.Draw(img)
    column_width = image_size / len(COLUMNS)
    for obj, (dx, dy) in zip(scene.objects, rendering.jitter):
        cx = column_width * (COLUMNS.index(obj.column) + 0.5) + dx
        cy = image_size / 2 + dy
        r = RADIUS_FRACTION[obj.size] * image_size * rendering.scale
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif obj.shape == "cross":
            arm = r / 2.5
            draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
            draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape}")
    return img
