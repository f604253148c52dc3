"""Burned-in text: one font, and wrapping that never cuts a word off at the picture's edge.

Pillow's scalable default font (Pillow >= 10.1) needs no font package. Text is
laid out in *groups* of *phrases*: a group starts a new line, its phrases share
lines as far as the width allows, and a phrase wider than the band is broken
between words rather than clipped (a clipped "not" changes what a caption says).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from PIL import ImageDraw, ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
LINE_SPACING = 1.35


def font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def font_size(width: int) -> int:
    """Caption size for a picture ``width`` pixels wide: readable, and ~48 characters across."""
    return max(12, width // 48)


def line_height(size: int) -> int:
    return int(size * LINE_SPACING)


def band_height(lines: int, size: int) -> int:
    """Height of a text band holding ``lines`` lines, with half a line of margin above and below."""
    return line_height(size) * lines + size


def _pack(pieces: Iterable[str], separator: str, width: int, face: Font) -> list[str]:
    """Greedy lines of ``pieces`` joined by ``separator``, none wider than ``width`` (an over-wide piece stays whole)."""
    lines: list[str] = []
    line = ""
    for piece in pieces:
        candidate = f"{line}{separator}{piece}" if line else piece
        if line and face.getlength(candidate) > width:
            lines.append(line)
            line = piece
        else:
            line = candidate
    lines.append(line)
    return lines


def layout(groups: Sequence[Sequence[str]], width: int, size: int) -> list[str]:
    """The lines of ``groups`` in a band ``width`` pixels wide at font ``size``.

    Each phrase is first broken between words, then the pieces of a group share lines, three spaces apart.
    """
    face = font(size)
    lines: list[str] = []
    for group in groups:
        pieces = [piece for phrase in group for piece in _pack(phrase.split(" "), " ", width, face)]
        lines.extend(_pack(pieces, "   ", width, face))
    return lines


def draw_lines(
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    lines: Sequence[str],
    size: int,
    fill: int | tuple[int, int, int],
    highlight: Sequence[bool] | None = None,
    highlight_fill: int | tuple[int, int, int] | None = None,
) -> int:
    """Draw ``lines`` down from ``origin``; a line flagged in ``highlight`` gets ``highlight_fill``.

    Returns the y just under the last line.
    """
    x, y = origin
    face = font(size)
    for number, line in enumerate(lines):
        marked = highlight is not None and highlight[number] and highlight_fill is not None
        draw.text((x, y), line, fill=highlight_fill if marked else fill, font=face)
        y += line_height(size)
    return y
