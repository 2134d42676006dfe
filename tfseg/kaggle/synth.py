"""The built-in synthetic dataset: 3D abdominal MRI phantoms written in exactly the Kaggle layout.

`python -m tfseg.synth --out DIR` writes DIR/train.csv (id,class,segmentation) and 16-bit PNG scans
under DIR/train/, like the UW-Madison GI Tract data, so every command runs with no download.
Each case has one anatomy (body, stomach, small-bowel loops, a large-bowel tube along the body's
edge, unlabelled look-alikes); each of its days moves and deforms it a little. Pixels carry a
per-case intensity scale, textures, a bias field and Rician noise. Same seed, same bytes.

`difficulty="hard"` adds what makes the real scans hard (each element seeded from its own streams,
[seed, case, 100, 7] for anatomy and [seed, case, day, 7] for a day, so "standard" keeps its bytes):

- Bowel contents: small and large bowel lumen and wall from one distribution per case (stool to
  fluid), a value per loop or colon piece; stomach fluid, food, gas in the same range. Stands for
  contents that look alike in both bowels and differ from loop to loop.
- Several pieces: small bowel in 2-3 separate packets; loops and colon with collapsed stretches
  (thin, unlabelled cords). Stands for bowel that leaves the slab or collapses.
- Look-alikes: unlabelled thin-walled tubes along z and walled blobs on 1-3 slices, with bowel
  intensities. Stand for ureters, vessels with bright flow, ducts; cysts, lymph nodes, cut vessels.
- Gas bubbles on the lumen's anterior (upper, supine) side, labelled as the organ: intraluminal gas.
- Tapering: organ ends thin and fade into fat over TAPER_MM of arc and of z: partial volume where
  organs begin and end.
- A second, shorter bias wave and 1.5-2x the noise: coil sensitivity, lower SNR.
- Slice motion: each slice moved by a random whole-pixel shift, its masks alike: breathing.
"""

import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree
from tqdm import tqdm

from tfseg import CLASSES, layout
from tfseg.draw import draw_contours, save_grid
from tfseg.errors import ConfigError, DataError, check_ranges
from tfseg.files import atomic_path, write_bytes
from tfseg.kaggle import rle
from tfseg.kaggle.constants import DIFFICULTIES, MAX_DAYS
from tfseg.kaggle.scans import encode_png

# The real table: (width, height, pixel spacing mm, slices, case-days) per scan size.
SIZES = ((266, 266, 1.50, 144, 180), (360, 310, 1.50, 144, 78), (276, 276, 1.63, 80, 15),
         (234, 234, 1.50, 144, 1))
FULL_CASES = (55, 24, 5, 1)  # cases per size with --full: 85 cases, 274 case-days, 38,496 slices
Z_EXTENT = 429.0  # mm the slices of a volume span (144 slices, 3 mm apart); fewer slices sample it coarser
SCALE_RANGE = (300.0, 30000.0)  # per-case intensity scale: the scan maxima of the real data's range
HEADER = "id,class,segmentation"
META = "synth.json"  # the options a dataset was made with, written next to train.csv

# Mean tissue intensities (fraction of the case's scale); each case jitters them a little.
TISSUE = {
    "fat": 0.52, "subcutaneous": 0.72, "muscle": 0.2, "liver": 0.32, "kidney": 0.6, "spine": 0.3,
    "vessel": 0.85, "fluid": 0.88, "sb_wall": 0.16, "sb_lumen": 0.74, "lb_wall": 0.14, "lb_lumen": 0.4,
    "st_wall": 0.15, "st_fluid": 0.86, "st_food": 0.5, "gas": 0.04,
}
# Hard small-bowel packets (lateral, antero-posterior, height as in COLON): jejunum upper left, right
# mid abdomen, pelvic ileum; far enough apart that the packets stay separate 3D pieces.
SB_PACKETS = ((0.33, -0.18, 0.6), (-0.34, -0.2, 0.4), (0.0, -0.05, 0.06))
TAPER_MM = 25.0  # hard: organ ends thin and fade over this much arc length and z
# Large-bowel centre line: rectum, sigmoid, descending, transverse, ascending colon, caecum as
# (lateral, antero-posterior: fractions of the body's half axes; height: fraction of the organ band).
COLON = ((0.0, 0.42, -0.02), (0.02, 0.36, 0.1), (0.2, 0.12, 0.17), (0.42, 0.0, 0.13), (0.62, 0.18, 0.24),
         (0.7, 0.2, 0.4), (0.72, 0.1, 0.6), (0.68, -0.2, 0.72), (0.3, -0.62, 0.62), (0.0, -0.68, 0.57),
         (-0.3, -0.62, 0.61), (-0.64, -0.28, 0.68), (-0.7, 0.1, 0.56), (-0.68, 0.15, 0.4), (-0.6, 0.05, 0.27))


@dataclass(frozen=True)
class Volume:
    """One case-day to generate: its place in the layout and its geometry."""

    case: int
    day: int
    width: int
    height: int
    spacing: float
    slices: int
    scale: float  # the case's intensity scale (scan maxima come out near it)
    difficulty: str = "standard"  # one of DIFFICULTIES

    @property
    def case_day(self) -> str:
        return f"case{self.case}_day{self.day}"

    def scan_path(self, root: str | os.PathLike, slice_num: int) -> Path:
        name = (f"slice_{slice_num:04d}_{self.width}_{self.height}_"
                f"{self.spacing:.2f}_{self.spacing:.2f}.png")
        return Path(root) / "train" / f"case{self.case}" / self.case_day / "scans" / name


def _split_days(rng, n_cases: int, total: int) -> np.ndarray:
    """Days per case, each 1..MAX_DAYS, summing to total."""
    days = np.ones(n_cases, int)
    for _ in range(total - n_cases):
        days[rng.choice(np.flatnonzero(days < MAX_DAYS))] += 1
    return days


def _check_difficulty(difficulty: str) -> None:
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"difficulty must be one of {', '.join(DIFFICULTIES)}; got {difficulty!r}")


def plan_volumes(cases: int = 6, seed: int = 0, *, full: bool = False, days: int | None = None,
                 num_slices: int | None = None, difficulty: str = "standard") -> list[Volume]:
    """The case-days a dataset holds, sorted by case and day (no pixels: cheap)."""
    _check_difficulty(difficulty)
    rng = np.random.default_rng([seed, 0])
    if full:
        if days is not None or num_slices is not None:
            raise ConfigError("full=True fixes the days and slices (the real table's mix)")
        size_of = np.repeat(np.arange(len(SIZES)), FULL_CASES)
        days_of = np.concatenate([_split_days(rng, n, size[4])
                                  for n, size in zip(FULL_CASES, SIZES, strict=True)])
        cases = len(size_of)
    else:
        check_ranges("synthetic dataset", [("cases", cases, cases >= 1, ">= 1"),
                                           ("days", days, days is None or 1 <= days <= MAX_DAYS, f"1..{MAX_DAYS}"),
                                           ("slices", num_slices, num_slices is None or num_slices >= 1, ">= 1")])
        weights = np.array([size[4] for size in SIZES], float)
        size_of = rng.choice(len(SIZES), cases, p=weights / weights.sum())
        days_of = rng.integers(1, MAX_DAYS + 1, cases) if days is None else np.full(cases, days)
    order = rng.permutation(cases)  # which case number gets which size and day count
    numbers = np.sort(rng.choice(np.arange(1, 2 * cases + 40), cases, replace=False))
    # Stratified in log space, so even two or three cases span hundreds to tens of thousands.
    strata = (rng.permutation(cases) + rng.random(cases)) / cases
    scales = np.exp(np.log(SCALE_RANGE[0]) + strata * np.log(SCALE_RANGE[1] / SCALE_RANGE[0]))
    volumes = []
    for number, k, scale in zip(numbers, order, scales, strict=True):
        width, height, spacing, depth, _ = SIZES[size_of[k]]
        for day in np.sort(rng.choice(np.arange(40), days_of[k], replace=False)):
            volumes.append(Volume(int(number), int(day), width, height, spacing, int(num_slices or depth),
                                  round(float(scale), 1), difficulty))
    return volumes


def _resample(points: np.ndarray, step: float) -> np.ndarray:
    """A smooth curve through control points, sampled every `step` mm of arc length."""
    chord = np.r_[0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]
    dense = CubicSpline(chord, points)(np.linspace(0, chord[-1], 20 * len(points)))
    arc = np.r_[0, np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))]
    s = np.arange(0, arc[-1], step)
    return np.stack([np.interp(s, arc, dense[:, i]) for i in range(3)], axis=1)


def _loops(rng, centre, half_axes, length: float, step: float) -> list[np.ndarray]:
    """Small-bowel centre lines: smooth random walks that turn back inside an ellipsoid."""
    curves = []
    n_loops = int(rng.integers(3, 6))
    for _ in range(n_loops):
        p = centre + half_axes * rng.uniform(-0.5, 0.5, 3)
        d = rng.normal(size=3)
        turn = np.zeros(3)
        points = []
        for _ in range(int(length / n_loops / step)):
            turn = 0.85 * turn + rng.normal(0, 0.12, 3)
            q = (p - centre) / half_axes
            inward = -q / half_axes * max(0.0, np.linalg.norm(q) - 0.75) * 60  # steer back before the edge
            d = d / np.linalg.norm(d) + turn + inward
            d /= np.linalg.norm(d)
            p = p + step * d
            points.append(p)
        curves.append(np.array(points))
    return curves


def _noise(rng, shape) -> np.ndarray:
    """Cheap near-Gaussian noise (sum of two uniform bytes, unit variance): far faster than normals."""
    u = np.frombuffer(rng.bytes(2 * shape[0] * shape[1]), np.uint8).reshape(2, *shape)
    return (u[0].astype(np.float32) + u[1] - 255) * np.float32(1 / 104.5)


def _taper(labelled: np.ndarray, step: float) -> np.ndarray:
    """0 at both ends of each run of labelled centre-line points, rising to 1 over TAPER_MM of arc."""
    dist = ndimage.distance_transform_edt(np.r_[0, labelled, 0])[1:-1]
    return np.clip((dist - 0.5) * step / TAPER_MM, 0, 1)


def _runs(flags: np.ndarray) -> list[np.ndarray]:
    """Indices of the runs of equal consecutive flags."""
    return np.split(np.arange(len(flags)), np.flatnonzero(np.diff(flags.astype(int))) + 1)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a moved by whole pixels (rows dy, columns dx), zero where nothing moves in."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[max(-dy, 0):h + min(-dy, 0),
                                                                  max(-dx, 0):w + min(-dx, 0)]
    return out


def _ellipsoid(x, y, z, centre, half, angle):
    """Pixels of one slice (z) inside an in-plane-rotated ellipsoid, or None when the slice misses it."""
    dz = (z - centre[2]) / half[2]
    if abs(dz) >= 1:
        return None
    c, s = np.cos(angle), np.sin(angle)
    xs, ys = x - centre[0], y - centre[1]
    u, v = (c * xs + s * ys) / half[0], (c * ys - s * xs) / half[1]
    return u * u + v * v < 1 - dz * dz


class Phantom:
    """One case-day: the case's anatomy (seeded by seed and case) moved by its day (seeded by the day).

    Anatomy lives in body-centred mm (x to the image's right, y down = posterior, z along the slices);
    each day maps it to the image with a small rotation, zoom, shift and smooth warp.
    """

    def __init__(self, vol: Volume, seed: int):
        self.vol = vol
        rng = np.random.default_rng([seed, vol.case])
        a = min(rng.uniform(145, 180), 0.42 * vol.width * vol.spacing)
        b = min(a * rng.uniform(0.68, 0.8), 0.4 * vol.height * vol.spacing)
        z0, zlen = rng.uniform(0.22, 0.3) * Z_EXTENT, rng.uniform(0.42, 0.52) * Z_EXTENT

        def at(u, v, f, jitter=0.03):  # body-relative place -> mm, moved a little per case
            u, v, f = np.array([u, v, f]) + rng.normal(0, jitter, 3)
            return np.array([u * a, v * b, z0 + f * zlen])

        self.a, self.b = a, b
        self.body_wave = rng.uniform(0, 2 * np.pi, 4), rng.normal(0, 0.018, 4)
        self.fat, self.muscle = rng.uniform(12, 28), rng.uniform(6, 10)
        t = self.tissue = {k: v * rng.uniform(0.92, 1.08) for k, v in TISSUE.items()}
        span = 10 * Z_EXTENT  # z half axis of things in every slice
        # Unlabelled structures as (intensity, centre, half axes, in-plane angle); fluid look-alikes too.
        blobs = [
            (t["liver"], at(-0.42, -0.1, 0.98), (0.5 * a, 0.72 * b, 0.36 * zlen), rng.uniform(-0.2, 0.2)),
            (t["kidney"], at(0.5, 0.45, 0.6), (27, 40, 0.2 * zlen), 0.35),
            (t["kidney"], at(-0.5, 0.45, 0.55), (27, 40, 0.2 * zlen), -0.35),
            (t["muscle"], at(0.25, 0.82, 0, 0.01), (0.17 * a, 0.15 * b, span), 0.0),
            (t["muscle"], at(-0.25, 0.82, 0, 0.01), (0.17 * a, 0.15 * b, span), 0.0),
            (t["spine"], at(0.0, 0.66, 0, 0.01), (21, 17, span), 0.0),
            (t["vessel"], at(0.1, 0.42, 0, 0.01), (10, 10, span), 0.0),
            (t["vessel"], at(-0.12, 0.42, 0, 0.01), (13, 9, span), 0.0),
            (t["fluid"], at(0.0, -0.15, -0.16), (45, 35, 0.12 * zlen), 0.0),  # bladder
            (t["fluid"], at(-0.3, -0.38, 0.74), (14, 20, 0.08 * zlen), 0.5),  # gallbladder
        ]
        for _ in range(rng.integers(1, 5)):  # cysts and fluid pockets
            value = rng.choice([t["sb_lumen"], t["st_fluid"], t["lb_lumen"]]) * rng.uniform(0.9, 1.1)
            place = at(rng.uniform(-0.6, 0.6), rng.uniform(-0.55, 0.35), rng.uniform(-0.1, 1.1))
            blobs.append((value, place, rng.uniform(6, 16, 3), rng.uniform(0, np.pi)))
        stomach = [(at(0.24, -0.2, 0.85), np.array([44, 38, 0.16 * zlen]), 0.2),  # fundus and body
                   (at(0.04, -0.38, 0.75), np.array([44, 22, 0.08 * zlen]), 0.3)]  # antrum
        self.stomach_wall = rng.uniform(5, 7.5)
        colon = _resample(np.array([at(*p, jitter=0.025) for p in COLON]), 2.0)
        s = np.arange(len(colon)) * 2.0
        haustra = 0.9 + 0.16 * np.abs(np.sin(np.pi * s / rng.uniform(28, 40)))
        # Narrow rectum and sigmoid, wide caecum.
        ends = np.interp(s / s[-1], [0, 0.2, 0.3, 0.9, 1], [0.75, 0.8, 1, 1, 1.2])
        self.colon_r = rng.uniform(15, 20) * haustra * ends
        loops = _loops(rng, at(-0.05, -0.1, 0.45), np.array([0.5 * a, 0.45 * b, 0.28 * zlen]),
                       rng.uniform(1800, 2600), 2.5)
        self.sb_r = rng.uniform(12, 15)

        rng = np.random.default_rng([seed, vol.case, vol.day])
        self.rng = rng  # per-slice textures and noise continue this stream
        self.shift = np.r_[rng.normal(0, 6, 2), rng.normal(0, 4)]
        angle, zoom = rng.normal(0, 0.04), rng.uniform(0.97, 1.03)
        self.affine = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        self.waves = (rng.normal(0, 2 * np.pi / 220, (2, 2, 3)), rng.uniform(0, 2 * np.pi, (2, 2)),
                      rng.uniform(1.5, 4, (2, 2)))
        fill = rng.uniform(0.85, 1.15)
        self.stomach = [(c, half * [fill, fill, 1], angle) for c, half, angle in stomach]
        self.content = rng.choice(["fluid", "food", "air"])
        self.air_level = stomach[0][0][1] - 0.3 * stomach[0][1][1]
        self.noise = rng.uniform(0.012, 0.035)
        self.bias = (rng.normal(0, 2 * np.pi / 400, (2, 3)), rng.uniform(0, 2 * np.pi, 2),
                     rng.uniform(0.08, 0.2, 2))
        self.day_tissue = rng.uniform(0.97, 1.03)
        self.colon_px = self._to_image(self._wobble(rng, colon, 3.0))
        self.sb_px = [self._to_image(self._wobble(rng, c, 4.0)) for c in loops]
        self.blobs = [(value, centre, half, angle, self._window(centre, max(half[:2])))
                      for value, centre, half, angle in blobs]
        self.stomach = [(c, half, angle, self._window(c, max(half[:2]))) for c, half, angle in self.stomach]
        self.hard = vol.difficulty == "hard"
        if self.hard:
            self._init_hard(seed, a, b, z0, zlen, colon, stomach)

    def _init_hard(self, seed, a, b, z0, zlen, colon, stomach):
        """The hard elements (module docstring), from their own streams so standard keeps its bytes."""
        vol, t = self.vol, self.tissue
        rng = np.random.default_rng([seed, vol.case, 100, 7])  # the case's anatomy: 100 is no day (< 40)
        day = np.random.default_rng([seed, vol.case, vol.day, 7])

        def at(u, v, f, jitter=0.03):
            u, v, f = np.array([u, v, f]) + rng.normal(0, jitter, 3)
            return np.array([u * a, v * b, z0 + f * zlen])

        # Bowel contents: one distribution for both bowels, from stool (negative: mottled, with gas)
        # to bright fluid, a value per loop or colon piece; the stomach's contents from the same range.
        mu = rng.uniform(0.45, 0.75)

        def contents(n=None):
            return mu * rng.uniform(0.65, 1.35, n) * np.where(rng.random(n) < 0.35, -1, 1)

        self.wall = t["sb_wall"] = t["lb_wall"] = t["st_wall"] = rng.uniform(0.12, 0.2)
        t["st_fluid"], t["st_food"] = mu * rng.uniform(1.05, 1.3), mu * rng.uniform(0.6, 0.9)

        # Small bowel: loops in 2-3 packets, some loops with a collapsed stretch; where a packet comes
        # near an earlier one it is collapsed too, so the packets stay separate 3D pieces.
        half = np.array([0.29 * a, 0.32 * b, 0.15 * zlen])
        sb_r = rng.uniform(10, 13)
        loops, sb_flags, earlier = [], [], []
        for p in rng.choice(len(SB_PACKETS), int(rng.integers(2, 4)), replace=False):
            packet = _loops(rng, at(*SB_PACKETS[p]), half, rng.uniform(800, 1200), 2.5)
            tree = cKDTree(np.concatenate(earlier)) if earlier else None
            for c in packet:
                flags = self._collapse(rng, len(c), int(rng.random() < 0.5), 8, 16)
                if tree is not None:
                    flags &= tree.query(c)[0] > 2 * sb_r + 15  # wobble moves each loop up to 4 mm
                sb_flags.append(flags)
            loops += packet
            earlier += packet
        sb_values = [np.full(len(c), contents()) for c in loops]
        # Large bowel: 1-2 collapsed stretches (sigmoid, transverse colon), contents per piece.
        lb_flags = self._collapse(rng, len(colon), int(rng.integers(1, 3)), 10, 20)
        lb_values = np.zeros(len(colon))
        for run in _runs(lb_flags):
            lb_values[run] = contents()
        # Unlabelled tubes: craniocaudal, thin-walled, bright (ureters, vessels, ducts); one may be anterior.
        tubes = []
        for i in range(int(rng.integers(2, 5))):
            side = rng.choice([-1, 1])
            front = i == 0 and rng.random() < 0.5
            u, v = side * rng.uniform(0.12, 0.4), rng.uniform(-0.5, 0.0) if front else rng.uniform(0.25, 0.5)
            top = rng.uniform(0.55, 0.95)
            ctrl = [at(u + rng.normal(0, 0.06), v + rng.normal(0, 0.05), f, 0.0) for f in np.linspace(-0.05, top, 5)]
            tubes.append((_resample(np.array(ctrl), 2.0), rng.uniform(5, 10), rng.uniform(1.5, 2.5),
                          mu * rng.uniform(0.9, 1.4)))
        # Unlabelled blobs on 1-3 slices, with a wall (cysts, lymph nodes, cross-cut vessels).
        step = Z_EXTENT / max(vol.slices - 1, 1)
        blobs = []
        for _ in range(int(rng.integers(8, 17))):
            centre = at(rng.uniform(-0.6, 0.6), rng.uniform(-0.55, 0.3), rng.uniform(0, 0.95), 0.0)
            half_axes = np.r_[rng.uniform(6, 14, 2), rng.uniform(0.6, 1.5) * step]
            blobs.append((self.wall * rng.uniform(0.8, 1.3), abs(contents()), centre, half_axes,
                          rng.uniform(0, np.pi)))

        # The day: peristalsis, tapered ends, gas, contents, stronger bias and noise, slice motion.
        sb_px = [self._to_image(self._wobble(day, c, 4.0)) for c in loops]
        entries = self._bowel(sb_px, [np.full(len(c), sb_r) for c in loops], sb_flags, sb_values, 1, 2.5)
        entries += self._bowel([self.colon_px], [self.colon_r], [lb_flags], [lb_values], 0, 2.0)
        for pts, r, wall_mm, value in tubes:
            pts = self._to_image(self._wobble(day, pts, 2.0))
            fade = 0.4 + 0.6 * _taper(np.ones(len(pts), bool), 2.0)
            entries.append((pts, r * fade, self._faded(self.wall, fade), self._faded(value, fade), wall_mm, -1))
        self.tubes = sorted(entries, key=lambda e: e[-1] >= 0)  # unlabelled first: bowel drawn over them
        self.hard_blobs = [(w, v, c, h, ang, self._window(c, max(h[:2]))) for w, v, c, h, ang in blobs]
        balls = [(e[0], e[1]) for e in entries if e[-1] >= 0]
        pts, r = np.concatenate([p for p, _ in balls]), np.concatenate([r for _, r in balls])
        pick = day.choice(len(pts), int(day.integers(10, 25)))
        # Gas rises to the lumen's anterior side (image up: the patient lies supine).
        self.gas = pts[pick] - np.outer(0.4 * r[pick], [0, 1, 0]), r[pick] * day.uniform(0.2, 0.45, len(pick))
        self.content = day.choice(["fluid", "food", "air", "mixed"])
        self.stomach_z = (min(c[2] - h[2] for c, h, _ in stomach), max(c[2] + h[2] for c, h, _ in stomach))
        self.noise *= day.uniform(1.5, 2.0)
        self.bias_hard = day.normal(0, 2 * np.pi / 250, 3), day.uniform(0, 2 * np.pi), day.uniform(0.15, 0.3)
        self.motion = np.clip(np.rint(day.normal(0, 1.0, (vol.slices, 2))), -3, 3).astype(int)

    @staticmethod
    def _collapse(rng, n: int, count: int, shortest: int, longest: int) -> np.ndarray:
        """Labelled flags of n centre-line points with `count` collapsed stretches away from the ends."""
        flags = np.ones(n, bool)
        for _ in range(count):
            length = int(rng.integers(shortest, longest + 1))
            if n > length + 4 * shortest:
                start = int(rng.integers(2 * shortest, n - length - 2 * shortest + 1))
                flags[start:start + length] = False
        return flags

    def _faded(self, value, fade):
        """Intensity blended toward the surrounding fat (partial volume); the sign (stool) kept."""
        return np.sign(value) * (self.tissue["fat"] + (np.abs(value) - self.tissue["fat"]) * fade)

    def _bowel(self, curves, radii, flags, values, organ, step):
        """Tube entries of one bowel: labelled runs thin and fade at their ends and at the organ's z ends;
        collapsed runs are thin unlabelled cords."""
        zs = np.concatenate([c[f, 2] for c, f in zip(curves, flags, strict=True)])
        zlo, zhi = zs.min(), zs.max()
        entries = []
        for pts, r, flag, value in zip(curves, radii, flags, values, strict=True):
            ends = np.clip(np.minimum(pts[:, 2] - zlo, zhi - pts[:, 2]) / TAPER_MM, 0, 1)
            g = np.minimum(_taper(flag, step), ends)
            fade, thin = 0.4 + 0.6 * g, 0.25 + 0.75 * g
            wall, lumen = self._faded(self.wall, fade), self._faded(value, fade)
            for run in _runs(flag):
                if flag[run[0]]:
                    entries.append((pts[run], r[run] * thin[run], wall[run], lumen[run], 3.0, organ))
                else:
                    n = len(run)
                    entries.append((pts[run], np.full(n, 3.5), np.full(n, self.wall), np.zeros(n), 0.0, -1))
        return entries

    def _warp(self, x, y, z):
        """Smooth in-plane displacement (mm) of this day at image positions."""
        k, phase, amp = self.waves
        return [sum(amp[i, j] * np.sin(k[i, j, 0] * x + k[i, j, 1] * y + k[i, j, 2] * z + phase[i, j])
                    for j in range(2)) for i in range(2)]

    @staticmethod
    def _wobble(rng, curve, amp):
        """Peristalsis: a day's smooth sideways movement along a centre line."""
        s = np.arange(len(curve))[:, None] / len(curve)
        return curve + amp * np.sin(2 * np.pi * s * rng.uniform(1, 4, 3) + rng.uniform(0, 2 * np.pi, 3))

    def _to_image(self, points):
        """Anatomy mm -> image mm (x, y, z) for this day."""
        xy = points[:, :2] @ self.affine.T + self.shift[:2]
        dx, dy = self._warp(xy[:, 0], xy[:, 1], points[:, 2])
        return np.stack([xy[:, 0] + dx, xy[:, 1] + dy, points[:, 2] + self.shift[2]], axis=1)

    def _pixels(self, x_mm, y_mm):
        vol = self.vol
        return x_mm / vol.spacing + (vol.width - 1) / 2, y_mm / vol.spacing + (vol.height - 1) / 2

    def _window(self, centre, radius):
        """Rows and columns that can hold a structure on this day (so slices only compute there)."""
        x, y, _ = self._to_image(np.asarray(centre, float)[None])[0]
        col, row = self._pixels(x, y)
        r = (radius * 1.05 + 2 * self.waves[2].max() + 4) / self.vol.spacing
        return (slice(max(0, int(row - r)), max(0, int(row + r) + 2)),
                slice(max(0, int(col - r)), max(0, int(col + r) + 2)))

    def _tubes(self, curves, radii, z, wall):
        """Outer and lumen masks of tubes (union of balls along centre lines) cut by the slice at z."""
        vol = self.vol
        outer = np.zeros((vol.height, vol.width), np.uint8)
        lumen = np.zeros_like(outer)
        for pts, r in zip(curves, radii, strict=True):
            r = np.broadcast_to(r, len(pts))
            hit = np.abs(pts[:, 2] - z) < r
            rr = np.sqrt(r[hit] ** 2 - (pts[hit, 2] - z) ** 2) / vol.spacing * 16
            cx, cy = (np.round(p * 16).astype(int).tolist() for p in self._pixels(pts[hit, 0], pts[hit, 1]))
            inner = rr - wall / vol.spacing * 16
            for x, y, r_out, r_in in zip(cx, cy, rr.astype(int).tolist(), inner.astype(int).tolist(),
                                         strict=True):
                cv2.circle(outer, (x, y), r_out, 1, -1, cv2.LINE_8, 4)  # 4 fractional bits: 1/16 px
                if r_in > 0:
                    cv2.circle(lumen, (x, y), r_in, 1, -1, cv2.LINE_8, 4)
        return outer.astype(bool), lumen.astype(bool)

    def _smooth_fields(self, z, coarse_grid):
        """Anatomy coordinates, body radius and bias field of slice z: smooth, so computed coarse."""
        xg, yg = coarse_grid
        dx, dy = self._warp(xg, yg, z)
        inv = np.linalg.inv(self.affine)
        xs, ys = xg - self.shift[0] - dx, yg - self.shift[1] - dy
        xa, ya = inv[0, 0] * xs + inv[0, 1] * ys, inv[1, 0] * xs + inv[1, 1] * ys
        za = z - self.shift[2]
        phase, amp = self.body_wave
        swell = 1 + 0.04 * np.sin(2 * np.pi * za / Z_EXTENT + phase[0])
        u, v = xa / (self.a * swell), ya / (self.b * swell)
        theta = np.arctan2(v, u)
        edge = 1 + sum(amp[i] * np.cos((i + 2) * theta + phase[i]) for i in range(len(amp)))
        rho = np.sqrt(u * u + v * v) / edge  # < 1 inside the body
        kb, pb, ab = self.bias
        bias = np.exp(sum(ab[i] * np.sin(kb[i, 0] * xg + kb[i, 1] * yg + kb[i, 2] * z + pb[i])
                          for i in range(2)))
        if self.hard:
            kh, ph, ah = self.bias_hard
            bias = bias * np.exp(ah * np.sin(kh[0] * xg + kh[1] * yg + kh[2] * z + ph))
        size = (self.vol.width, self.vol.height)
        return [cv2.resize(f.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
                for f in (xa, ya, rho, bias)] + [za]

    def _draw_tube(self, val, label, pts, r, wall, lumen, wall_mm, z):
        """One tube cut by the slice at z: wall then lumen values into val (and its outline into label),
        so a later tube keeps its own wall where it touches an earlier one."""
        hit = np.abs(pts[:, 2] - z) < r
        if not hit.any():
            return
        sp = self.vol.spacing
        rr = np.sqrt(r[hit] ** 2 - (pts[hit, 2] - z) ** 2) / sp * 16
        cx, cy = (np.round(p * 16).astype(int).tolist() for p in self._pixels(pts[hit, 0], pts[hit, 1]))
        outer, inner = rr.astype(int).tolist(), (rr - wall_mm / sp * 16).astype(int).tolist()
        walls, lumens = wall[hit].tolist(), lumen[hit].tolist()
        for x, y, r_out, v in zip(cx, cy, outer, walls, strict=True):
            cv2.circle(val, (x, y), r_out, v, -1, cv2.LINE_8, 4)
            if label is not None:
                cv2.circle(label, (x, y), r_out, 1, -1, cv2.LINE_8, 4)
        for x, y, r_in, v in zip(cx, cy, inner, lumens, strict=True):
            if r_in > 0 and v != 0:
                cv2.circle(val, (x, y), r_in, v, -1, cv2.LINE_8, 4)

    def _organs_hard(self, z, img, xa, ya, za, cavity, texture, coarse, fine):
        """Draw the hard slice's look-alikes and organs into img; return the large-bowel, small-bowel,
        stomach and look-alike masks (look-alikes: unlabelled tubes, cords and blobs, where no organ is)."""
        t, h, w = self.tissue, *img.shape
        val = np.zeros((h, w), np.float32)  # tube and blob intensities, negative for stool; 0: none
        labels = np.zeros((2, h, w), np.uint8)
        lookalike = None
        for wall, lumen, centre, half, angle, win in self.hard_blobs:
            outer = _ellipsoid(xa[win], ya[win], za, centre, half, angle)
            if outer is not None:
                inner = _ellipsoid(xa[win], ya[win], za, centre, half - np.r_[2.5, 2.5, 0], angle)
                val[win][outer] = wall
                val[win][inner] = lumen
        for pts, r, wall, lumen, wall_mm, organ in self.tubes:
            if organ >= 0 and lookalike is None:  # the unlabelled entries come first
                lookalike = val != 0
            self._draw_tube(val, labels[organ] if organ >= 0 else None, pts, r, wall, lumen, wall_mm, z)
        lookalike = val != 0 if lookalike is None else lookalike
        tube, stool = (val != 0) & cavity, val < 0
        np.copyto(img, val * (texture + 0.12 * coarse + 0.06 * fine), where=tube & ~stool)
        np.copyto(img, np.where(coarse > 1.2, t["gas"], -val * (1 + 0.35 * fine)), where=tube & stool)
        lb_out, sb_out = labels[0].astype(bool) & cavity, labels[1].astype(bool) & cavity
        centres, radii = self.gas
        hit = np.abs(centres[:, 2] - z) < radii
        if hit.any():
            gas = np.zeros((h, w), np.uint8)
            rr = np.sqrt(radii[hit] ** 2 - (centres[hit, 2] - z) ** 2) / self.vol.spacing * 16
            cx, cy = (np.round(p * 16).astype(int).tolist() for p in self._pixels(centres[hit, 0], centres[hit, 1]))
            for x, y, r in zip(cx, cy, rr.astype(int).tolist(), strict=True):
                cv2.circle(gas, (x, y), r, 1, -1, cv2.LINE_8, 4)
            np.copyto(img, t["gas"] * texture, where=gas.astype(bool) & (lb_out | sb_out))

        lo, hi = self.stomach_z
        g = np.clip(min(za - lo, hi - za) / TAPER_MM, 0, 1)
        stomach = np.zeros((h, w), bool)
        for centre, half, angle, win in self.stomach:
            inside = _ellipsoid(xa[win], ya[win], za, centre, half * np.r_[0.4 + 0.6 * g, 0.4 + 0.6 * g, 1], angle)
            if inside is not None:
                stomach[win] |= inside
        stomach &= cavity
        if stomach.any():
            depth = cv2.distanceTransform(stomach.astype(np.uint8), cv2.DIST_L2, 5) * self.vol.spacing
            inner = stomach & (depth > self.stomach_wall * (1 + 0.3 * coarse))
            fluid, food = t["st_fluid"] * texture, t["st_food"] * (1 + 0.3 * fine)
            cap = ya < self.air_level
            content = {"fluid": fluid, "food": food, "air": np.where(cap, t["gas"], fluid),
                       "mixed": np.where(cap, t["gas"], food)}[self.content]
            np.copyto(img, t["st_wall"] * texture, where=stomach)
            np.copyto(img, content, where=inner)
            fade = 0.4 + 0.6 * g
            background = t["fat"] * texture
            np.copyto(img, background + (img - background) * fade, where=stomach)
        return lb_out, sb_out, stomach, lookalike & cavity & ~(lb_out | sb_out | stomach)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """Scans uint16 [D, H, W] and masks uint8 [D, H, W, 3] (tfseg.CLASSES order, 0/1)."""
        vol, t, rng = self.vol, self.tissue, self.rng
        h, w, d = vol.height, vol.width, vol.slices
        # A coarse grid placed where cv2.resize samples, so upsampling interpolates it exactly.
        hc, wc = h // 8 + 2, w // 8 + 2
        xc = (np.arange(wc) + 0.5) * w / wc - 0.5 - (w - 1) / 2
        yc = (np.arange(hc) + 0.5) * h / hc - 0.5 - (h - 1) / 2
        grid = np.meshgrid(xc * vol.spacing, yc * vol.spacing)
        image = np.empty((d, h, w), np.uint16)
        mask = np.zeros((d, h, w, 3), np.uint8)
        if self.hard:
            self.lookalikes = np.zeros((d, h, w), bool)  # where unlabelled look-alikes are (tests, inspection)
        for k, z in enumerate(np.linspace(0, Z_EXTENT, d) if d > 1 else [Z_EXTENT / 2]):
            xa, ya, rho, bias, za = self._smooth_fields(z, grid)
            fine = cv2.GaussianBlur(_noise(rng, (h, w)), (0, 0), 1.0) * 3.5
            coarse = cv2.resize(cv2.GaussianBlur(_noise(rng, (h // 4, w // 4)), (0, 0), 1.0) * 4.0, (w, h))
            texture = 1 + 0.06 * coarse + 0.03 * fine

            # Body: subcutaneous fat and a muscle wall around the abdominal cavity.
            body, cavity = rho < 1, rho < 1 - (self.fat + self.muscle) / self.a
            img = np.where(body, t["subcutaneous"] * texture, 0).astype(np.float32)
            np.copyto(img, t["muscle"] * texture, where=rho < 1 - self.fat / self.a)
            np.copyto(img, t["fat"] * texture, where=cavity)
            for value, centre, half, angle, win in self.blobs:
                inside = _ellipsoid(xa[win], ya[win], za, centre, half, angle)
                if inside is not None:
                    np.copyto(img[win], value * texture[win], where=inside & cavity[win])

            if self.hard:
                *organs, lookalike = self._organs_hard(z, img, xa, ya, za, cavity, texture, coarse, fine)
                dy, dx = self.motion[k]
                moved = [_shift(a, dy, dx) for a in (img, *organs, lookalike)]
                img, lb_out, sb_out, stomach, self.lookalikes[k] = moved
            else:
                # The organs, each confined to the cavity.
                sb_out, sb_lumen = self._tubes(self.sb_px, [self.sb_r] * len(self.sb_px), z, 3.5)
                lb_out, lb_lumen = self._tubes([self.colon_px], [self.colon_r], z, 3.0)
                stomach = np.zeros((h, w), bool)
                for centre, half, angle, win in self.stomach:
                    inside = _ellipsoid(xa[win], ya[win], za, centre, half, angle)
                    if inside is not None:
                        stomach[win] |= inside
                sb_out &= cavity
                lb_out &= cavity
                stomach &= cavity
                np.copyto(img, t["sb_wall"] * texture, where=sb_out)
                np.copyto(img, t["sb_lumen"] * (texture + 0.12 * coarse + 0.06 * fine), where=sb_out & sb_lumen)
                np.copyto(img, t["lb_wall"] * texture, where=lb_out)
                stool = np.where(coarse > 1.0, t["gas"], t["lb_lumen"] * (1 + 0.35 * fine))
                np.copyto(img, stool, where=lb_out & lb_lumen)
                if stomach.any():
                    depth = cv2.distanceTransform(stomach.astype(np.uint8), cv2.DIST_L2, 5) * vol.spacing
                    inner = stomach & (depth > self.stomach_wall * (1 + 0.3 * coarse))
                    fluid = t["st_fluid"] * texture
                    content = {"fluid": fluid, "food": t["st_food"] * (1 + 0.3 * fine),
                               "air": np.where(ya < self.air_level, t["gas"], fluid)}[self.content]
                    np.copyto(img, t["st_wall"] * texture, where=stomach)
                    np.copyto(img, content, where=inner)

            # Acquisition: partial-volume blur, smooth bias field, Rician noise, the case's scale.
            img = cv2.GaussianBlur(img, (0, 0), 0.7) * bias * self.day_tissue
            real = img + self.noise * _noise(rng, (h, w))
            imag = self.noise * _noise(rng, (h, w))
            signal = np.sqrt(real * real + imag * imag) * vol.scale
            image[k] = np.clip(np.rint(signal), 0, 65535).astype(np.uint16)
            mask[k] = np.stack([lb_out, sb_out, stomach], axis=-1)
        return image, mask


def render_volume(vol: Volume, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scans uint16 [D, H, W] and masks uint8 [D, H, W, 3] of one planned volume."""
    return Phantom(vol, seed).render()


def _write_volume(job) -> list[str]:
    """Worker: render one volume, write its scans (each atomically), return its train.csv rows."""
    root, vol, seed = job
    image, mask = render_volume(vol, seed)
    for stale in vol.scan_path(root, 1).parent.glob(".slice_*.tmp"):  # left by a killed earlier run
        stale.unlink(missing_ok=True)
    rows = []
    for k in range(vol.slices):
        write_bytes(vol.scan_path(root, k + 1), encode_png(image[k], params=()))
        sid = f"{vol.case_day}_slice_{k + 1:04d}"
        rows += [f"{sid},{name},{rle.encode(mask[k, :, :, c])}" for c, name in enumerate(CLASSES)]
    return rows


def _single_thread():
    cv2.setNumThreads(1)  # processes already fill the cores


def dataset_options(out_dir: str | os.PathLike) -> dict | None:
    """The options a complete dataset in out_dir was made with (DIR/synth.json), None if there is none.
    A complete dataset without synth.json predates difficulties: standard."""
    out = Path(out_dir)
    if not (out / "train.csv").exists():
        return None
    if not (out / META).exists():
        return {"difficulty": "standard"}
    try:
        return json.loads((out / META).read_text())
    except ValueError as err:
        raise DataError(f"{out / META}: not JSON ({err})") from err


def _options(volumes: list[Volume], seed: int, full: bool, difficulty: str) -> dict:
    """What DIR/synth.json records: enough to tell whether a dataset was made with other options."""
    return {"difficulty": difficulty, "seed": seed, "cases": len({v.case for v in volumes}),
            "case_days": len(volumes), "slices": sum(v.slices for v in volumes), "full": full}


def changed_options(out_dir: str | os.PathLike, cases: int = 6, seed: int = 0, *, full: bool = False,
                    days: int | None = None, num_slices: int | None = None, difficulty: str = "standard"
                    ) -> list[str] | None:
    """None if out_dir holds no complete dataset; else how its options differ from these ([] if they do not).
    A dataset without synth.json (made before it existed) is compared on its difficulty only."""
    existing = dataset_options(out_dir)
    if existing is None:
        return None
    wanted = _options(plan_volumes(cases, seed, full=full, days=days, num_slices=num_slices,
                                   difficulty=difficulty), seed, full, difficulty)
    return [f"{key} {existing[key]!r} -> {value!r}" for key, value in wanted.items()
            if key in existing and existing[key] != value]


def make_dataset(out_dir: str | os.PathLike, cases: int = 6, seed: int = 0, *, full: bool = False,
                 days: int | None = None, num_slices: int | None = None, workers: int | None = None,
                 progress: bool = True, difficulty: str = "standard", overwrite: bool = False) -> Path:
    """Write the synthetic dataset to out_dir (DIR/synth.json, then train.csv last).

    If a complete dataset is there (train.csv exists) it is kept and returned at once, unless it was
    made with other options (ConfigError naming them, see changed_options) or overwrite is set (its
    train.csv, synth.json and train/ are deleted first).
    """
    out = Path(out_dir)
    _check_difficulty(difficulty)
    changed = changed_options(out, cases, seed, full=full, days=days, num_slices=num_slices, difficulty=difficulty)
    if changed is not None and not overwrite:
        if changed:
            raise ConfigError(f"{out} holds a synthetic dataset made with other options ({'; '.join(changed)}): "
                              "pass --overwrite to replace it, or choose another --out")
        return out
    volumes = plan_volumes(cases, seed, full=full, days=days, num_slices=num_slices, difficulty=difficulty)
    if overwrite:
        (out / "train.csv").unlink(missing_ok=True)  # first, so an interrupted overwrite is incomplete
        (out / META).unlink(missing_ok=True)
        shutil.rmtree(out / "train", ignore_errors=True)
    jobs = [(out, vol, seed) for vol in volumes]
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    bar = tqdm(total=sum(v.slices for v in volumes), unit="slice", desc="synth", disable=not progress)
    rows = [HEADER]
    # Always in fresh spawned processes, even for one worker: the bytes then never depend on the
    # caller's state (TensorFlow's threads, library thread pools), only on the seed.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_single_thread) as pool:
        for vol, vol_rows in zip(volumes, pool.imap(_write_volume, jobs), strict=True):
            rows += vol_rows
            bar.update(vol.slices)
    bar.close()
    with atomic_path(out / META) as tmp:
        tmp.write_text(json.dumps(_options(volumes, seed, full, difficulty), indent=1) + "\n")
    with atomic_path(out / "train.csv") as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return out


def ensure_dataset(out_dir: str | os.PathLike = layout.SYNTH_DATA_DIR) -> Path:
    """The default synthetic dataset at out_dir, made first if it is missing."""
    out = Path(out_dir)
    if not (out / "train.csv").exists():
        print(f"making the synthetic dataset in {out} (python -m tfseg.synth)", file=sys.stderr)
        make_dataset(out)
    return out


def preview_picks(labels: dict[str, dict[str, list[str]]], count: int) -> list[tuple[str, str]]:
    """Up to `count` distinct (case-day, slice id) tiles: case-days of different cases first, then
    further days, then further slices of those; each tile rotates to the next class, taking the
    middle one of the unused slices showing it."""
    by_case: dict[str, list[str]] = {}
    for case_day in labels:
        by_case.setdefault(case_day.split("_")[0], []).append(case_day)
    order = [days[i] for i in range(MAX_DAYS) for days in by_case.values() if i < len(days)]
    picks: list[tuple[str, str]] = []
    for i in range(count * len(CLASSES)):  # enough rounds to fill count tiles from few case-days
        if len(picks) == count or not order:
            break
        case_day, wanted = order[i % len(order)], len(picks) % len(CLASSES)
        free = [sid for sid in labels[case_day] if (case_day, sid) not in picks]
        showing = [sid for sid in free if labels[case_day][sid][wanted]] or free
        if showing:
            picks.append((case_day, showing[len(showing) // 2]))
    return picks


def preview(data_dir: str | os.PathLike, path: str | os.PathLike, count: int = 6) -> Path:
    """Save a grid of slices from different case-days with their mask contours."""
    data_dir = Path(data_dir)
    labels: dict[str, dict[str, list[str]]] = {}  # case_day -> slice id -> three RLEs
    for line in (data_dir / "train.csv").read_text().splitlines()[1:]:
        sid, _, rle_text = line.split(",")
        labels.setdefault(sid.rsplit("_slice_", 1)[0], {}).setdefault(sid, []).append(rle_text)
    images, titles = [], []
    for case_day, sid in preview_picks(labels, count):
        case, _ = case_day.split("_")
        scan_dir = data_dir / "train" / case / case_day / "scans"
        scan_path = next(scan_dir.glob(f"slice_{sid.rsplit('_', 1)[1]}_*.png"), None)
        if scan_path is None:
            raise DataError(f"{scan_dir}: no scan for {sid}, which {data_dir / 'train.csv'} lists")
        scan = cv2.imread(str(scan_path), cv2.IMREAD_UNCHANGED)
        mask = np.stack([rle.decode(r, scan.shape) for r in labels[case_day][sid]], axis=-1)
        images.append(draw_contours(scan, mask))
        titles.append(f"{sid}\n{scan.shape[1]}x{scan.shape[0]}, max {scan.max()}")
    return save_grid(images, titles, path)


def count_slices(data_dir: str | os.PathLike) -> int:
    """Slices listed in a dataset's train.csv (three rows each)."""
    with open(Path(data_dir) / "train.csv") as f:
        return (sum(1 for _ in f) - 1) // len(CLASSES)
