"""Display orientation of video frames: FFmpeg's display matrix, snapped to the 8 axis-aligned cases.

Phones store video as the sensor codes it and put a 3x3 display matrix in the track header (mp4/mov
``tkhd``; Matroska's projection pose; H.264/HEVC display-orientation SEI): players rotate or mirror
the picture by it. FFmpeg hands the matrix to decoded frames as ``DISPLAYMATRIX`` side data: nine
int32 in row-major order ``a b u / c d v / x y w`` (16.16 fixed point, ``u v w`` 2.30), mapping a
coded pixel (x, y) (x right, y down) to display (a*x + c*y + x0, b*x + d*y + y0). So
``a=0, b=1, c=-1, d=0`` (what an iPhone held upright writes) is a quarter turn clockwise.

Rule: the 2x2 part of the matrix is snapped to the nearest of the 8 signed permutation matrices
(the 4 quarter turns, each optionally mirrored): the one with the largest inner product with
(a, b, c, d). For a pure rotation by an angle that is not a multiple of 90 degrees this is the
nearest quarter turn (30 -> 0, 60 -> 90); exact ties (odd multiples of 45) go to the earlier of
:data:`CASES` (45 -> 0, 135 -> 90). Mirror images keep their mirroring. Scale and translation are
ignored (the picture is squashed to a square anyway). Why snap rather than rotate by the exact angle
(FFmpeg's command line inserts its ``rotate`` filter) or reject: an odd angle in a real file is a
tilt or an authoring slip, a free rotation would add black corners and cut the picture's corners
off in a square frame, and rejecting would throw away a clip whose sound and motion are usable.

Since the output frame is square, squashing to S x S then applying the orientation gives the same
picture as applying it to the full-size frame then squashing (each source axis is scaled to S
either way): :meth:`Orientation.apply` runs on the small squashed frame, which is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CASES", "IDENTITY", "Orientation", "from_display_matrix", "from_frame"]

_FIXED = 65536.0  # 16.16


@dataclass(frozen=True)
class Orientation:
    """An axis-aligned display transform: optionally swap the axes, then mirror columns / rows.

    ``angle`` is the display matrix's own clockwise rotation in degrees before snapping (None when
    the frame carries no matrix); ``mirrored`` tells whether the matrix flips handedness.
    """

    transpose: bool = False
    flip_x: bool = False  # mirror left-right (after the transpose)
    flip_y: bool = False  # mirror top-bottom (after the transpose)
    angle: float | None = None
    mirrored: bool = False

    @property
    def key(self) -> tuple[bool, bool, bool]:
        return self.transpose, self.flip_x, self.flip_y

    @property
    def is_identity(self) -> bool:
        return self.key == (False, False, False)

    @property
    def snapped(self) -> bool:
        """True when the matrix's angle is not a multiple of 90 degrees (so it was snapped)."""
        if self.angle is None:
            return False
        return abs(self.angle - 90 * round(self.angle / 90)) > 0.5

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The picture as displayed: ``image`` is (H, W, C) or (T, H, W, C); returns a view."""
        y, x = image.ndim - 3, image.ndim - 2  # row and column axes
        if self.transpose:
            image = np.swapaxes(image, y, x)
        if self.flip_x:
            image = np.flip(image, axis=x)
        if self.flip_y:
            image = np.flip(image, axis=y)
        return image

    def describe(self) -> str:
        """E.g. ``rotated 90° clockwise``, ``mirrored left-right``, ``as coded``."""
        text = _NAMES[self.key]
        if self.snapped:
            kind = "mirrored, " if self.mirrored else ""
            text += f" (display matrix {kind}{self.angle:.1f}° clockwise, snapped to a quarter turn)"
        return text


# (a, b, c, d) of each case -> (transpose, flip_x, flip_y): x' = a*x + c*y, y' = b*x + d*y
CASES: dict[tuple[int, int, int, int], tuple[bool, bool, bool]] = {
    (1, 0, 0, 1): (False, False, False),
    (0, 1, -1, 0): (True, True, False),  # 90° clockwise
    (-1, 0, 0, -1): (False, True, True),  # 180°
    (0, -1, 1, 0): (True, False, True),  # 90° counter-clockwise
    (-1, 0, 0, 1): (False, True, False),  # mirror left-right
    (1, 0, 0, -1): (False, False, True),  # mirror top-bottom
    (0, 1, 1, 0): (True, False, False),  # transpose (main diagonal)
    (0, -1, -1, 0): (True, True, True),  # anti-diagonal
}
_NAMES = {
    (False, False, False): "as coded",
    (True, True, False): "rotated 90° clockwise",
    (False, True, True): "rotated 180°",
    (True, False, True): "rotated 90° counter-clockwise",
    (False, True, False): "mirrored left-right",
    (False, False, True): "mirrored top-bottom",
    (True, False, False): "transposed (mirrored across the main diagonal)",
    (True, True, True): "transposed across the anti-diagonal",
}
IDENTITY = Orientation()


def from_display_matrix(matrix) -> Orientation:
    """Snap FFmpeg's 9-int32 display matrix (a sequence or raw 36 bytes) to an :class:`Orientation`."""
    if isinstance(matrix, (bytes, bytearray, memoryview)):
        matrix = np.frombuffer(bytes(matrix), dtype="<i4")
    if len(matrix) != 9:
        raise ValueError(f"a display matrix has 9 entries, got {len(matrix)}")
    a, b, c, d = (float(matrix[i]) / _FIXED for i in (0, 1, 3, 4))
    if not any((a, b, c, d)):
        return IDENTITY
    best = max(CASES, key=lambda p: p[0] * a + p[1] * b + p[2] * c + p[3] * d)  # max keeps the first of ties
    return Orientation(*CASES[best], angle=math.degrees(math.atan2(b, a)) % 360.0, mirrored=a * d - b * c < 0)


def from_frame(frame) -> Orientation:
    """The orientation a decoded PyAV video frame asks for (:data:`IDENTITY` without a matrix)."""
    side = frame.side_data.get("DISPLAYMATRIX")
    return IDENTITY if side is None else from_display_matrix(bytes(side))
