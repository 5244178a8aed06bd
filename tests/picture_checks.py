"""Checks that a file is a real picture: PNG signature and header, SVG that parses."""

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError if it is not a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND" or b"IEND" in data[-16:], "truncated PNG"
    return struct.unpack(">II", data[16:24])


def assert_png(path, min_side: int = 32, max_side: int = 20000) -> tuple[int, int]:
    w, h = png_size(path)
    assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
    assert Path(path).stat().st_size > 500
    return w, h


def assert_svg(path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg"), root.tag
    return root
