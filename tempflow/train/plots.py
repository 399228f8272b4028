"""PNGs drawn with Pillow (no plotting library needed): the trainer's reward curve and image grids."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def line_chart(series: dict[str, Sequence[float]], path: str, title: str = "", size=(640, 400)) -> None:
    """Write ``series`` (name -> values, x = 1..n) as a line chart PNG, atomically."""
    w, h = size
    left, right, top, bottom = 56, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [v for s in series.values() for v in s]
    if not values:
        raise ValueError("nothing to plot")
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(s) for s in series.values())

    def xy(i, v):
        x = left + (w - left - right) * (i / max(n - 1, 1))
        y = top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = lo + frac * (hi - lo)
        _, y = xy(0, v)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{v:.3g}", fill=(0, 0, 0))
    draw.text((left, h - bottom + 8), "1", fill=(0, 0, 0))
    draw.text((w - right - 30, h - bottom + 8), f"{n}", fill=(0, 0, 0))
    draw.text((left, 6), title, fill=(0, 0, 0))
    for c, (name, s) in enumerate(series.items()):
        color = COLORS[c % len(COLORS)]
        if len(s) > 1:
            draw.line([xy(i, v) for i, v in enumerate(s)], fill=color, width=2)
        draw.text((w - right - 200, top + 6 + 14 * c), name, fill=color)
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def moving_average(values: Sequence[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def filmstrip(videos: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """Videos ``(B, F, C, H, W)`` as images ``(B, C, H, k W)``: ``k = min(F, max_frames)`` frames evenly spaced from
    the first to the last, side by side."""
    f = videos.shape[1]
    k = min(f, max_frames)
    idx = torch.linspace(0, f - 1, k).round().long() if k > 1 else torch.zeros(1, dtype=torch.long)
    return torch.cat(list(videos[:, idx].unbind(1)), dim=-1)


def save_grid(images: torch.Tensor, columns: int, path: str, scale: int = 4, pad: int = 2) -> None:
    """Write (B, C, H, W) images in [0, 1] as one PNG grid, ``columns`` per row, each pixel ``scale`` x ``scale``.
    Videos ``(B, F, C, H, W)`` are drawn as :func:`filmstrip` s (up to 8 frames side by side)."""
    if images.dim() == 5:
        images = filmstrip(images)
    b, c, h, w = images.shape
    rows = (b + columns - 1) // columns
    canvas = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    rgb = images.float().clamp(0, 1).expand(-1, 3, -1, -1) if c == 1 else images.float().clamp(0, 1)
    for i in range(b):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top : top + h, left : left + w] = rgb[i]
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(pixels)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def save_gif(video: torch.Tensor, path: str, fps: float = 16, scale: int = 1) -> None:
    """Write one video ``(F, C, H, W)`` in [0, 1] as an animated GIF (Pillow) looping at ``fps`` frames per second
    (Wan's 16 by default; GIF keeps a frame's time in hundredths of a second, so 16 fps plays at 1/0.06 s), each
    pixel ``scale`` x ``scale``."""
    if video.dim() != 4 or video.shape[1] not in (1, 3):
        raise ValueError(f"a video must be (F, C, H, W) with C = 1 or 3, got {tuple(video.shape)}")
    rgb = video.float().clamp(0, 1).expand(-1, 3, -1, -1)
    pixels = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    frames = [Image.fromarray(p) for p in pixels]
    if scale > 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)


def band_chart(curves: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], path: str,
               title: str = "", xlabel: str = "", size=(640, 400)) -> None:  # fmt: skip
    """Write curves ``name -> (x, mean, std)`` as lines with a shaded mean +- std band (over seeds), atomically."""
    w, h = size
    left, right, top, bottom = 56, 16, 28, 40
    ys = [m + s * d for _, ms, ss in curves.values() for m, s in zip(ms, ss, strict=True) for d in (-1, 1)]
    xs = [x for xv, _, _ in curves.values() for x in xv]
    if not ys:
        raise ValueError("nothing to plot")
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1

    def xy(x, v):
        return (left + (w - left - right) * (x - x0) / (x1 - x0), top + (h - top - bottom) * (1 - (v - lo) / (hi - lo)))

    img = Image.new("RGB", size, "white")
    band = Image.new("RGBA", size, (0, 0, 0, 0))
    draw, shade = ImageDraw.Draw(img), ImageDraw.Draw(band)
    palette = COLORS + [(148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34)]
    for c, (xv, ms, ss) in enumerate(curves.values()):
        color = palette[c % len(palette)]
        upper = [xy(x, m + s) for x, m, s in zip(xv, ms, ss, strict=True)]
        lower = [xy(x, m - s) for x, m, s in zip(xv, ms, ss, strict=True)]
        if len(upper) > 1:
            shade.polygon(upper + lower[::-1], fill=(*color, 48))
    img.paste(band, (0, 0), band)
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(x0, lo + frac * (hi - lo))
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{lo + frac * (hi - lo):.3g}", fill=(0, 0, 0))
        x, _ = xy(x0 + frac * (x1 - x0), lo)
        draw.line([x, h - bottom, x, h - bottom + 4], fill=(0, 0, 0))
        label = f"{x0 + frac * (x1 - x0):.3g}"
        draw.text((x - (6 * len(label) if frac == 1.0 else 10), h - bottom + 6), label, fill=(0, 0, 0))
    draw.text((left, 6), title, fill=(0, 0, 0))
    draw.text((w // 2 - 3 * len(xlabel), h - 14), xlabel, fill=(0, 0, 0))
    for c, (name, (xv, ms, _)) in enumerate(curves.items()):
        color = palette[c % len(palette)]
        if len(xv) > 1:
            draw.line([xy(x, m) for x, m in zip(xv, ms, strict=True)], fill=color, width=2)
        for x, m in zip(xv, ms, strict=True):
            px, py = xy(x, m)
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.text((left + 8, top + 6 + 14 * c), name, fill=color)
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
