"""Image grids for reports and run directories."""

from __future__ import annotations

from PIL import Image


def image_grid(images: list[Image.Image], rows: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile ``images`` row-major into ``rows`` rows, each upscaled ``scale``x with nearest pixels."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = -(-len(images) // rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for index, image in enumerate(images):
        r, c = divmod(index, cols)
        tile = image.convert("RGB").resize((w, h), Image.NEAREST)
        grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
