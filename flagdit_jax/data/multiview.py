"""Text-to-multi-view on rendered 3-D solids, made by code (no download, no new dependency).

A tiny numpy rasteriser renders a few solids (cube, pyramid, roof prism, octahedron, L block) in a
few colours with flat shading: an orthographic camera at a small fixed elevation, a light fixed to
the camera, 4x4 supersampling. A record is one object seen by a camera turning about the vertical
axis: view k at azimuth `start + k * 360 / T` (Lumina-T2X's multi-view = T views as T frames), RGB in
[-1, 1] on a black (-1) background. Start azimuths lie on a 15-degree grid, so every view of 4, 6, 8,
12 or 24 views is on that grid and each (solid, azimuth) is rasterised once (cached).

The caption names colour and solid: <bos> "a" <colour> <solid>, as fixed random word embeddings
(`data/words.py`). Record i is drawn from `default_rng((seed, split, i))`: deterministic by index.
The train split has `views` frames per record; the eval split cycles through `eval_views` (more
views than trained: does the model stay consistent past its training length?).
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

from flagdit_jax.data.words import WordCaptions

AZIMUTH_STEP = 15  # degrees; the grid of start azimuths and of every view (360 / T must be a multiple)
COLOURS = {"red": (0.95, 0.15, 0.12), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0),
           "yellow": (0.95, 0.9, 0.12)}
_LIGHT = np.array([-0.45, 0.75, 0.5]) / np.linalg.norm([-0.45, 0.75, 0.5])  # camera space: upper left, front
_AMBIENT = 0.3
_HALF_EXTENT = 1.15  # world units from the image centre to its border
_SUPERSAMPLE = 4


def _box(x0, x1, y0, y1, z0, z1):
    v = np.array([(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)], float)
    # faces as vertex loops (any winding: faces are drawn two-sided with a depth test)
    faces = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
    return v, faces


def _extrude(outline, z0, z1):
    """A prism from a 2-D outline in the x-y plane (a simple polygon, counter-clockwise)."""
    n = len(outline)
    v = np.array([(x, y, z) for z in (z0, z1) for x, y in outline], float)
    sides = [(i, (i + 1) % n, n + (i + 1) % n, n + i) for i in range(n)]
    return v, sides + [tuple(range(n)), tuple(range(n, 2 * n))]


def _solids() -> dict:
    a = 0.6
    pyramid_v = np.array([(-0.7, -0.55, -0.7), (0.7, -0.55, -0.7), (0.7, -0.55, 0.7), (-0.7, -0.55, 0.7),
                          (0.0, 0.75, 0.0)])
    pyramid_f = [(0, 1, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)]
    octa_v = 0.9 * np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)], float)
    octa_f = [(x, y, z) for x in (0, 1) for y in (2, 3) for z in (4, 5)]
    # the L's outline is not convex: its two end caps are given as two convex pieces each
    l_out = [(-0.6, -0.6), (0.6, -0.6), (0.6, 0.0), (0.0, 0.0), (0.0, 0.6), (-0.6, 0.6)]
    l_v, l_f = _extrude(l_out, -0.35, 0.35)
    l_f = l_f[:-2] + [(0, 1, 2, 3), (0, 3, 4, 5), (6, 7, 8, 9), (6, 9, 10, 11)]
    roof_v, roof_f = _extrude([(-0.75, -0.5), (0.75, -0.5), (0.0, 0.65)], -0.65, 0.65)
    return {"cube": _box(-a, a, -a, a, -a, a), "pyramid": (pyramid_v, pyramid_f), "prism": (roof_v, roof_f),
            "octahedron": (octa_v, octa_f), "lblock": (l_v, l_f)}


SOLIDS = _solids()
SOLID_NAMES = tuple(SOLIDS)


def _triangles(verts: np.ndarray, faces) -> tuple[np.ndarray, np.ndarray]:
    """Fan triangulation of convex faces: (triangles [F, 3, 3], face normals [F, 3], unit)."""
    tris = np.array([[verts[f[0]], verts[f[i]], verts[f[i + 1]]] for f in faces for i in range(1, len(f) - 1)])
    n = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    return tris, n / np.linalg.norm(n, axis=1, keepdims=True)


def camera(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """World -> camera rotation [3, 3]: turn the object by `azimuth` about the vertical (y) axis, then
    tilt it by `elevation` about x so the camera (looking down -z) sees its top."""
    a, e = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    return rx @ ry


def rasterize(solid: str, azimuth_deg: float, elevation_deg: float, size: int,
              supersample: int = _SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Flat-shaded orthographic render of `solid`: (shade [size, size] = light intensity times pixel
    coverage, in [0, 1]; coverage [size, size] in [0, 1]). Depth test per sample, two-sided faces."""
    if solid not in SOLIDS:
        raise ValueError(f"solid {solid!r}; expected one of {SOLID_NAMES}")
    if not isinstance(size, (int, np.integer)) or size < 4 or supersample < 1:
        raise ValueError(f"size={size!r} must be an int >= 4 and supersample={supersample!r} >= 1")
    tris, normals = _triangles(*SOLIDS[solid])
    r = camera(azimuth_deg, elevation_deg)
    tris, normals = tris @ r.T, normals @ r.T
    normals = normals * np.where(normals[:, 2:] < 0, -1.0, 1.0)  # two-sided: the side facing the camera
    shade = _AMBIENT + (1 - _AMBIENT) * np.clip(normals @ _LIGHT, 0.0, None)
    m = size * supersample
    c = ((np.arange(m) + 0.5) / m * 2 - 1) * _HALF_EXTENT
    px, py = np.meshgrid(c, -c)  # row 0 at the top (+y)
    depth = np.full((m, m), -np.inf)
    value = np.zeros((m, m))
    for tri, s in zip(tris, shade):
        (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = tri
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-12:  # seen edge-on
            continue
        w1 = ((px - x0) * (y2 - y0) - (x2 - x0) * (py - y0)) / area
        w2 = ((x1 - x0) * (py - y0) - (px - x0) * (y1 - y0)) / area
        w0 = 1 - w1 - w2
        inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
        z = w0 * z0 + w1 * z1 + w2 * z2
        nearer = inside & (z > depth)
        depth = np.where(nearer, z, depth)
        value = np.where(nearer, s, value)
    pool = lambda a: a.reshape(size, supersample, size, supersample).mean((1, 3))  # noqa: E731
    return pool(value), pool(np.isfinite(depth).astype(float))


@functools.lru_cache(maxsize=4096)
def _shade(solid: str, azimuth_deg: int, elevation_deg: float, size: int) -> np.ndarray:
    out = rasterize(solid, azimuth_deg, elevation_deg, size)[0].astype(np.float32)
    out.flags.writeable = False
    return out


def render(solid: str, colour: str, azimuths, elevation_deg: float, size: int) -> np.ndarray:
    """Views `[T, size, size, 3]` float32 in [-1, 1] (background -1) of `solid` in `colour` at the
    grid `azimuths` (degrees, multiples of AZIMUTH_STEP)."""
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r}; expected one of {tuple(COLOURS)}")
    az = [int(a) % 360 for a in azimuths]
    if any(a % AZIMUTH_STEP for a in az) or any(float(a) % AZIMUTH_STEP for a in azimuths):
        raise ValueError(f"azimuths {list(azimuths)} must be multiples of {AZIMUTH_STEP} degrees")
    rgb = np.asarray(COLOURS[colour], np.float32)
    shade = np.stack([_shade(solid, a, float(elevation_deg), int(size)) for a in az])
    return shade[..., None] * rgb * 2 - 1


def check_views(views, what: str) -> tuple[int, ...]:
    views = tuple(int(v) for v in (views if isinstance(views, (tuple, list)) else (views,)))
    if not views or any(v < 1 or 360 % v or (360 // v) % AZIMUTH_STEP for v in views):
        raise ValueError(f"{what}={views}: view counts must divide 360 into multiples of {AZIMUTH_STEP} degrees "
                         "(1, 2, 3, 4, 6, 8, 12, 24)")
    return views


class MultiViewSource:
    """`source[i]` -> {'frames' [T, size, size, 3] float32 in [-1, 1], 'cap_feats' [cap_len, cap_dim],
    'cap_mask' [cap_len] bool, 'label' (solid id), 'colour' (colour id), 'azimuth' [T] degrees};
    `frame_shapes()` -> [N, 3]; `null_caption()`; `save_media(stem, frames)` -> turntable GIF."""

    def __init__(self, split: str = "train", *, size: int = 16, views=(4,), eval_views=(4, 8),
                 num_records: int = 4000, eval_records: int = 400, elevation: float = 25.0,
                 random_start: bool = True, cap_dim: int = 32, cap_len: int = 4, embed_seed: int = 0, seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split {split!r}; expected 'train' or 'eval'")
        if not isinstance(size, (int, np.integer)) or size < 8:
            raise ValueError(f"size={size!r} must be an int >= 8 (pixels per side)")
        if not -60.0 <= float(elevation) <= 60.0:
            raise ValueError(f"elevation={elevation!r} must be in [-60, 60] degrees")
        n = num_records if split == "train" else eval_records
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{'num_records' if split == 'train' else 'eval_records'}={n!r} must be an int >= 1")
        self.views = check_views(views if split == "train" else eval_views,
                                 "views" if split == "train" else "eval_views")
        self.split, self.size, self.n, self.elevation = split, int(size), int(n), float(elevation)
        self.random_start, self.seed = bool(random_start), int(seed)
        self.captions = WordCaptions(("a", *COLOURS, *SOLID_NAMES), cap_dim=cap_dim, cap_len=cap_len,
                                     embed_seed=embed_seed)

    def __len__(self) -> int:
        return self.n

    def record(self, index: int) -> dict:
        """The draw behind record `index`: {'solid', 'colour', 'azimuths' [T]} (names and degrees)."""
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} out of range [0, {self.n})")
        rng = np.random.default_rng((self.seed, self.split == "eval", index))
        solid = SOLID_NAMES[rng.integers(len(SOLID_NAMES))]
        colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
        start = int(rng.integers(360 // AZIMUTH_STEP)) * AZIMUTH_STEP if self.random_start else 0
        t = self.views[index % len(self.views)]
        return {"solid": solid, "colour": colour, "azimuths": [(start + k * 360 // t) % 360 for k in range(t)]}

    def caption_words(self, index: int) -> list[str]:
        r = self.record(index)
        return ["<bos>", "a", r["colour"], r["solid"]]

    def frame_shapes(self) -> np.ndarray:
        return np.array([(self.views[i % len(self.views)], self.size, self.size) for i in range(self.n)], np.int64)

    def null_caption(self) -> dict[str, np.ndarray]:
        return self.captions.null()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        r = self.record(index)
        feats, mask = self.captions.encode(["<bos>", "a", r["colour"], r["solid"]])
        return {"frames": render(r["solid"], r["colour"], r["azimuths"], self.elevation, self.size),
                "cap_feats": feats, "cap_mask": mask, "label": np.int32(SOLID_NAMES.index(r["solid"])),
                "colour": np.int32(tuple(COLOURS).index(r["colour"])), "azimuth": np.array(r["azimuths"], np.int32)}

    def save_media(self, path_stem, frames: np.ndarray, scale: int = 4, ms_per_view: int = 250) -> list[pathlib.Path]:
        """Turntable GIF `<path_stem>.gif` of `frames` [n, T, H, W, 3] in [-1, 1]: the n samples side by
        side, one GIF frame per view, pixels enlarged `scale` times; returns [path]."""
        from PIL import Image

        frames = np.asarray(frames)
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [n, T, H, W, 3], got shape {frames.shape}")
        n, t, h, w, _ = frames.shape
        row = frames.transpose(1, 2, 0, 3, 4).reshape(t, h, n * w, 3)  # per view: the samples side by side
        row = np.uint8(np.clip((row + 1) * 127.5, 0, 255).round()).repeat(scale, 1).repeat(scale, 2)
        images = [Image.fromarray(f) for f in row]
        path = pathlib.Path(str(path_stem) + ".gif")
        path.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_view, loop=0)
        return [path]

    def __repr__(self) -> str:
        return f"MultiViewSource(split={self.split!r}, n={self.n}, size={self.size}, views={self.views})"
