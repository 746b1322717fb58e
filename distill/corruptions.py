"""Natural corruptions: the 15 CIFAR-10-C corruptions at 5 severities, and the released CIFAR-10-C files.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019. The parameter tables are the CIFAR ones of the authors' generation script
(github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py), cross-checked against an independent copy
of that script (matanle51/Splitting-the-Difference-on-Adversarial-Training, make_cifar_c.py); they are facts
copied as numbers (``CIFAR_PARAMETERS``). The code is this toolkit's own: vectorized over the batch, float images
in [0, 1] (no uint8 round trips except JPEG, which needs bytes), RGB and grayscale, any image size the corruption
can work on, and seeded per image.

    x = corrupt(images, "fog", severity=3, seed=0)      # images (N, H, W) or (N, H, W, C), C in {1, 3}
    x, y = load_cifar10c("CIFAR-10-C", "fog", 3)          # the released files, when a user has them

Reproducibility: every random draw for image i comes from its own generator,
``SeedSequence(seed, spawn_key=(k, severity, indices[i]))`` with k the corruption's position in ``CORRUPTIONS``,
so a corrupted image depends only on (seed, name, severity, the image, its dataset index): corrupting a chunk or a
subset with its dataset ``indices`` gives exactly the images the whole set gives.

Where the original relies on tools or data this toolkit does not have, the equivalent is documented on the
corruption's function below: motion blur (ImageMagick's MotionBlurImage, re-implemented as its one-sided Gaussian
line kernel), frost (photographs of frost, replaced by a procedural texture with the table's blending weights),
HSV brightness (a closed form), and the grayscale versions of the RGB-only steps.
"""
from __future__ import annotations

import functools
import io
import math
import numbers
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["CORRUPTIONS", "FAMILIES", "SEVERITIES", "CIFAR_PARAMETERS", "CIFAR10C_EXTRA", "corrupt",
           "load_cifar10c"]

#: The 15 corruptions, in CIFAR-10-C's file naming (``<name>.npy``) and order.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise",
               "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
               "snow", "frost", "fog", "brightness",
               "contrast", "elastic_transform", "pixelate", "jpeg_compression")

#: The paper's four families.
FAMILIES = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
            "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
            "weather": ("snow", "frost", "fog", "brightness"),
            "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression")}

SEVERITIES = (1, 2, 3, 4, 5)

#: The four held-out corruptions that ship with the released CIFAR-10-C files (loadable, not generated here).
CIFAR10C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# CIFAR parameter tables of make_cifar_c.py (Hendrycks & Dietterich 2019), one entry per severity 1..5.
# elastic_transform's entries are fractions of the image side (the script writes IMSIZE * f with IMSIZE = 32).
CIFAR_PARAMETERS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                      # std of N(0, c^2)
    "shot_noise": (500, 250, 100, 75, 50),                                 # Poisson(c x) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                       # salt-and-pepper amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),          # (radius, alias_blur)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # (sigma, delta, iters)
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),                          # (radius, sigma)
    # zoom factors: the script's np.arange(1, stop, 0.01); float rounding keeps the stop for 1.06 and 1.11 only
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),                           # arange stop
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),       # (mean, std, zoom, threshold, blur radius, blur sigma, mix)
             (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # (image weight, frost weight)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),          # (strength, wibble decay)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                             # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                               # (x - mean) c + mean
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),   # (alpha, sigma, affine) / side
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                             # downscale factor (BOX)
    "jpeg_compression": (80, 65, 58, 50, 40),                              # JPEG quality
}

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)   # ITU-R 601 luma, as OpenCV's RGB2GRAY
_CHUNK = 1000                                                # images per vectorized block (cache-friendly)


# ============================================================================================== public API
def corrupt(images, name: str, severity: int, seed: int = 0, indices=None) -> np.ndarray:
    """Apply CIFAR-10-C corruption ``name`` at ``severity`` (1..5) to a batch.

    images: float (N, H, W) grayscale or (N, H, W, C) with C in {1, 3}, values in [0, 1];
    returns float32 of the same shape, in [0, 1].
    seed, indices: image i is corrupted with the random stream of (seed, name, severity, indices[i]);
    indices (N,) non-negative integers, default arange(N): pass the dataset indices of a chunk or subset to get
    exactly the images the full set gives.
    Raises ValueError for an unknown name, a severity outside 1..5, values outside [0, 1] or NaN, a bad shape or
    an image too small for the corruption.
    """
    name = _check_name(name, CORRUPTIONS)
    severity = _check_severity(severity)
    seed = _check_seed(seed)
    x, restore = _as_nhwc(images)
    n, h, w, _ = x.shape
    if min(h, w) < _MIN_SIDE[name]:
        raise ValueError(f"{name} needs images of at least {_MIN_SIDE[name]}x{_MIN_SIDE[name]} pixels, got {h}x{w}")
    indices = _check_indices(indices, n)
    params = CIFAR_PARAMETERS[name][severity - 1]
    function = _IMPLEMENTATIONS[name]
    out = np.empty_like(x)
    for start in range(0, n, _CHUNK):
        block = slice(start, min(start + _CHUNK, n))
        rngs = _image_rngs(seed, name, severity, indices[block]) if name in _RANDOM else None
        out[block] = function(x[block], params, rngs)
    np.clip(out, 0.0, 1.0, out=out)
    return restore(out)


def load_cifar10c(directory, name: str, severity: int, limit: int | None = None):
    """Load one severity of a released CIFAR-10-C corruption (Hendrycks & Dietterich 2019).

    directory holds ``<name>.npy`` (uint8 (5 n, H, W, 3): severity s is rows (s-1) n .. s n, n = 10,000 for the
    release) and ``labels.npy`` (5 n labels). Returns x float32 (m, H, W, 3) in [0, 1] and y int64 (m,), with m = n
    or the first ``limit`` images. ``name`` is one of CORRUPTIONS or CIFAR10C_EXTRA. Raises FileNotFoundError for a
    missing folder or file and ValueError for an unknown name, a bad severity or limit, or a file of the wrong
    shape or type.
    """
    name = _check_name(name, CORRUPTIONS + CIFAR10C_EXTRA)
    severity = _check_severity(severity)
    if limit is not None and not (isinstance(limit, numbers.Integral) and not isinstance(limit, bool)
                                  and limit >= 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10-C folder {str(folder)!r} does not exist (it should hold <name>.npy and "
                                f"labels.npy from the CIFAR-10-C release)")
    images = _load_npy(folder / f"{name}.npy")
    labels = _load_npy(folder / "labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] % 5 \
            or images.shape[0] == 0:
        raise ValueError(f"{folder / (name + '.npy')}: expected uint8 images of shape (5 n, H, W, 3) (CIFAR-10-C: "
                         f"(50000, 32, 32, 3)), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{folder / 'labels.npy'}: expected {images.shape[0]} integer labels (one per image of "
                         f"{name}.npy), got {labels.dtype} {labels.shape}")
    per_severity = images.shape[0] // 5
    count = per_severity if limit is None else min(limit, per_severity)
    rows = slice((severity - 1) * per_severity, (severity - 1) * per_severity + count)
    x = np.asarray(images[rows], dtype=np.float32) / np.float32(255.0)
    y = np.asarray(labels[rows], dtype=np.int64)
    return x, y


# ============================================================================================== validation
def _check_name(name, valid) -> str:
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(valid)}")
    return name


def _check_severity(severity) -> int:
    if not (isinstance(severity, numbers.Integral) and not isinstance(severity, bool) and 1 <= severity <= 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def _check_seed(seed) -> int:
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_indices(indices, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.shape != (n,) or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise ValueError(f"indices must be an integer array of shape ({n},) (one dataset index per image), got "
                         f"{indices.dtype} {indices.shape}")
    if indices.size and indices.min() < 0:
        raise ValueError(f"indices must be non-negative, got {int(indices.min())}")
    return indices.astype(np.int64)


def _as_nhwc(images):
    """images -> (x float32 (N, H, W, C), restore: (N, H, W, C) -> the caller's shape)."""
    x = np.asarray(images)
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"images must be a real float array in [0, 1], got dtype {x.dtype}")
    if x.ndim == 3:
        restore = lambda out: out[..., 0]      # noqa: E731
        x = x[..., None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        restore = lambda out: out               # noqa: E731
    else:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C) with C in {{1, 3}}, got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size:
        if np.isnan(x).any():
            raise ValueError("images contain NaN")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"image values must lie in [0, 1], got [{low:g}, {high:g}] (scale uint8 images by 1/255)")
    return x, restore


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the CIFAR-10-C release has <name>.npy and labels.npy)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy array: {err}") from None


# ============================================================================================== randomness
def _image_rngs(seed: int, name: str, severity: int, indices: np.ndarray) -> list:
    """One generator per image: SeedSequence(seed, spawn_key=(k, severity, index)), k = CORRUPTIONS.index(name)."""
    k = CORRUPTIONS.index(name)
    return [np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(k, severity, int(i)))))
            for i in indices]


def _per_image(rngs, draw) -> np.ndarray:
    """Stack draw(rng) over the images' generators: (N, ...)."""
    return np.stack([draw(rng) for rng in rngs])


# ============================================================================================== helpers
def _luminance(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, H, W, 1): 0.299 R + 0.587 G + 0.114 B, or the single channel itself."""
    return x if x.shape[-1] == 1 else (x @ _LUMA)[..., None]


def _blur(x: np.ndarray, sigma: float, mode: str, truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of the spatial axes of (N, H, W[, C]) (scipy.ndimage.gaussian_filter, per image)."""
    sigmas = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _fold_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map integer pixel indices into 0..n-1 by the border rule: 'edge' (clamp), 'mirror' (d c b | a b c d | c b a,
    OpenCV's REFLECT_101) or 'reflect' (c b a | a b c d | d c b, scipy's reflect)."""
    if mode == "edge" or n == 1:
        return np.clip(i, 0, n - 1)
    if mode == "mirror":
        period = 2 * (n - 1)
        i = np.mod(i, period)
        return np.where(i >= n, period - i, i)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


def _bilinear_sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """out[n, i, j] = bilinear interpolation of x[n] (N, H, W, C) at (rows[n, i, j], cols[n, i, j]), neighbours
    outside the image folded back by ``mode`` (see _fold_index)."""
    n, h, w, c = x.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0).astype(np.float32)[..., None], (cols - c0).astype(np.float32)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    ra, rb = _fold_index(r0, h, mode) * w, _fold_index(r0 + 1, h, mode) * w
    ca, cb = _fold_index(c0, w, mode), _fold_index(c0 + 1, w, mode)
    flat = x.reshape(n, h * w, c)
    image = np.arange(n)[:, None, None]
    top = flat[image, ra + ca] * (1 - fc) + flat[image, ra + cb] * fc
    bottom = flat[image, rb + ca] * (1 - fc) + flat[image, rb + cb] * fc
    return top * (1 - fr) + bottom * fr


def _apply_axis_map(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """out = matrix applied along ``axis`` of x: out[..., i, ...] = sum_j matrix[i, j] x[..., j, ...], as a sum of
    K gathers (K = most non-zeros in a row), so every image is computed the same way whatever the batch."""
    index, weight = _sparse_rows(matrix)
    shape = [1] * x.ndim
    shape[axis] = matrix.shape[0]
    out = np.zeros(x.shape[:axis] + (matrix.shape[0],) + x.shape[axis + 1:], dtype=np.float32)
    for k in range(index.shape[1]):
        out += weight[:, k].reshape(shape) * np.take(x, index[:, k], axis=axis)
    return out


def _sparse_rows(matrix: np.ndarray):
    """Dense (m, n) -> index (m, K) int, weight (m, K) float32 of each row's non-zeros (zero-padded)."""
    nonzero = matrix != 0
    k = max(int(nonzero.sum(axis=1).max()), 1)
    order = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]
    weight = np.take_along_axis(matrix, order, axis=1).astype(np.float32)
    return order, weight


@functools.lru_cache(maxsize=None)
def _clipped_zoom_matrix(n: int, zoom: float) -> np.ndarray:
    """(n, n) linear map of make_cifar_c's clipped_zoom along one axis: crop the central ceil(n / zoom) pixels,
    zoom them by ``zoom`` with linear interpolation (scipy.ndimage.zoom, order 1, corners aligned: output o
    samples o (crop - 1) / (round(crop zoom) - 1)), keep the central n."""
    crop = int(np.ceil(n / zoom))
    top = (n - crop) // 2
    zoomed = int(round(crop * zoom))
    trim = (zoomed - n) // 2
    matrix = np.zeros((n, n))
    for r in range(n):
        coordinate = (trim + r) * (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
        low = min(int(np.floor(coordinate)), crop - 1)
        frac = coordinate - low
        matrix[r, top + low] += 1.0 - frac
        if frac > 0:
            matrix[r, top + low + 1] += frac
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=None)
def _box_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear map of Pillow's BOX resampling along one axis (taken from Pillow itself, float mode)."""
    identity = Image.fromarray(np.eye(n_in, dtype=np.float32), mode="F")
    matrix = np.asarray(identity.resize((n_out, n_in), Image.Resampling.BOX), dtype=np.float64).T.copy()
    matrix.setflags(write=False)
    return matrix


def _clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """make_cifar_c's clipped_zoom on (N, H, W, C): centre crop, zoom by ``zoom``, centre trim to (H, W)."""
    x = _apply_axis_map(x, _clipped_zoom_matrix(x.shape[1], zoom), axis=1)
    return _apply_axis_map(x, _clipped_zoom_matrix(x.shape[2], zoom), axis=2)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """Motion blur of (N, H, W, C) along angles (N,) in degrees, as ImageMagick's MotionBlurImage: a one-sided
    line kernel of width K = 2 ceil(radius) + 1 with weights w_i ~ exp(-i^2 / (2 sigma^2)), i = 0..K-1,
    out(y, x) = sum_i w_i img(y + dy_i, x + dx_i), dx_i = ceil(i cos a - 1/2), dy_i = ceil(i sin a - 1/2),
    pixels outside the image replaced by the nearest edge pixel."""
    n, h, w, c = x.shape
    taps = np.arange(int(2 * math.ceil(radius) + 1))
    weights = np.exp(-(taps ** 2) / (2.0 * sigma ** 2))
    weights = (weights / weights.sum()).astype(np.float32)
    angle = np.radians(np.asarray(angles, dtype=np.float64))[:, None]
    dx = np.ceil(taps * np.cos(angle) - 0.5).astype(np.int64)                 # (N, K)
    dy = np.ceil(taps * np.sin(angle) - 0.5).astype(np.int64)
    rows = np.clip(np.arange(h)[None, None, :] + dy[:, :, None], 0, h - 1) * w  # (N, K, H)
    cols = np.clip(np.arange(w)[None, None, :] + dx[:, :, None], 0, w - 1)      # (N, K, W)
    flat = x.reshape(n, h * w, c)
    image = np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for k, weight in enumerate(weights):
        out += weight * flat[image, rows[:, k, :, None] + cols[:, k, None, :]]
    return out


def _plasma_size(h: int, w: int) -> int:
    return max(2, 1 << (max(h, w) - 1).bit_length())


def _plasma_fractal(uniform: np.ndarray, size: int, decay: float) -> np.ndarray:
    """Diamond-square height maps (N, size, size) in [0, 1], size a power of two, wrapping at the borders, as
    make_cifar_c's plasma_fractal: at each scale, new points are the mean of their 4 neighbours plus
    wibble^2 U(-1, 1), wibble starting at 100 and divided by ``decay`` per scale; then min-max normalized.
    uniform (N, size^2 - 1) in [0, 1) supplies the noise, consumed in a fixed order."""
    n = uniform.shape[0]
    heights = np.zeros((n, size, size))
    step, wibble, used = size, 100.0, 0

    def noisy_mean(total):
        nonlocal used
        count = total[0].size
        noise = uniform[:, used:used + count].reshape(total.shape)
        used += count
        return total / 4 + wibble * wibble * (2.0 * noise - 1.0)

    while step >= 2:
        half = step // 2
        corners = heights[:, 0::step, 0::step]
        total = corners + np.roll(corners, -1, axis=1)
        heights[:, half::step, half::step] = noisy_mean(total + np.roll(total, -1, axis=2))
        centres, corners = heights[:, half::step, half::step], heights[:, 0::step, 0::step]
        heights[:, 0::step, half::step] = noisy_mean(centres + np.roll(centres, 1, axis=1)
                                                     + corners + np.roll(corners, -1, axis=2))
        heights[:, half::step, 0::step] = noisy_mean(centres + np.roll(centres, 1, axis=2)
                                                     + corners + np.roll(corners, -1, axis=1))
        step //= 2
        wibble /= decay
    heights -= heights.min(axis=(1, 2), keepdims=True)
    return heights / heights.max(axis=(1, 2), keepdims=True)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's defocus kernel: the normalized indicator of x^2 + y^2 <= radius^2 on the integer grid
    (-8..8, or -r..r above radius 8), smoothed by a 3x3 (5x5 above radius 8) Gaussian of std ``alias_blur``
    (as cv2.GaussianBlur), cropped to its non-zero support."""
    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(-1, 2) if radius <= 8 else np.arange(-2, 3)
    gauss = np.exp(-(taps ** 2) / (2.0 * alias_blur ** 2))
    gauss /= gauss.sum()
    kernel = ndimage.correlate1d(ndimage.correlate1d(disk, gauss, axis=0, mode="constant"), gauss, axis=1,
                                 mode="constant")
    rows, cols = np.nonzero(kernel > 0)
    return kernel[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


# ============================================================================================== corruptions
# Each takes x (N, H, W, C) float32 in [0, 1], the severity's table entry and the images' generators (None for the
# deterministic ones) and returns (N, H, W, C); corrupt() clips to [0, 1].
def _gaussian_noise(x, c, rngs):
    """x + N(0, c^2), per pixel and channel."""
    return x + np.float32(c) * _per_image(rngs, lambda g: g.standard_normal(x.shape[1:], dtype=np.float32))


def _shot_noise(x, c, rngs):
    """Poisson(c x) / c, per pixel and channel."""
    lam = x.astype(np.float64) * c
    return (np.stack([g.poisson(lam_i) for g, lam_i in zip(rngs, lam)]) / c).astype(np.float32)


def _impulse_noise(x, c, rngs):
    """Salt and pepper (skimage's random_noise 's&p'): each value, with probability c, becomes 0 or 1 (even odds)."""
    u = _per_image(rngs, lambda g: g.random((2,) + x.shape[1:], dtype=np.float32))
    return np.where(u[:, 0] < c, (u[:, 1] < 0.5).astype(np.float32), x)


def _defocus_blur(x, params, rngs):
    """Correlation with the anti-aliased disk kernel (_disk_kernel), borders mirrored (OpenCV's filter2D default).
    Radii below 1 make the disk a single pixel, so severities 1-3 are 3x3 Gaussians of std 0.4, 0.5, 0.6."""
    kernel = _disk_kernel(*params).astype(np.float32)
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _glass_blur(x, params, rngs):
    """Gaussian blur (std sigma, borders 'nearest', as skimage), then ``iterations`` passes of the script's local
    pixel shuffle, then the Gaussian blur again. The script visits h = H-1..2, w = W-1..2 (max_delta 1) and does
    ``x[h, w], x[h+dy, w+dx] = x[h+dy, w+dx], x[h, w]`` with dx, dy ~ randint(-1, 1), i.e. in {-1, 0}; on an
    (H, W, C) array both sides are views, so this copies x[h+dy, w+dx] into x[h, w] and the source is kept (not a
    swap). Every source lies up or left of the target, still unvisited, so one pass is a single gather: that is
    what the released CIFAR-10-C holds, and it is reproduced here (the script's intermediate uint8 truncation,
    at most 1/255, is not)."""
    sigma, delta, iterations = params
    if delta != 1:
        raise NotImplementedError("the CIFAR table's glass blur has max_delta 1 only")
    n, h, w, c = x.shape
    offsets = _per_image(rngs, lambda g: g.integers(-1, 1, size=(iterations, 2, h - 2, w - 2)))  # (dy, dx)
    x = _blur(x, sigma, mode="nearest")
    rows, cols = np.arange(2, h), np.arange(2, w)
    image = np.arange(n)[:, None, None]
    for it in range(iterations):
        source = np.arange(h * w).reshape(1, h, w).repeat(n, axis=0)
        source[:, 2:, 2:] = ((rows[None, :, None] + offsets[:, it, 0]) * w
                             + cols[None, None, :] + offsets[:, it, 1])
        x = x.reshape(n, h * w, c)[image, source]
    return _blur(x, sigma, mode="nearest")


def _motion_blur_corruption(x, params, rngs):
    """ImageMagick's MotionBlurImage(radius, sigma, angle ~ U(-45, 45) degrees), re-implemented (_motion_blur):
    the script called it through Wand, which this toolkit does not use."""
    radius, sigma = params
    angles = _per_image(rngs, lambda g: g.uniform(-45.0, 45.0))
    return _motion_blur(x, radius, sigma, angles)


def _zoom_blur(x, stop, rngs):
    """Mean of x and its clipped zooms by np.arange(1, stop, 0.01) (the script's factors, 1 included)."""
    out = x.copy()
    factors = np.arange(1, stop, 0.01)
    for zoom in factors:
        out += _clipped_zoom(x, float(zoom))
    return out / np.float32(len(factors) + 1)


def _snow(x, params, rngs):
    """The script's snow: a layer N(mean, std^2) per pixel, clipped-zoomed, values below the threshold set to 0,
    clipped to [0, 1], motion-blurred (radius, sigma, angle ~ U(-135, -45) degrees, as _motion_blur); the image is
    mixed towards max(x, 1.5 gray + 0.5) (gray: 601 luma for RGB, the channel itself for grayscale), then the layer
    and its 180-degree rotation are added. (The script's 8-bit PNG round trip of the layer is not reproduced.)"""
    mean, std, zoom, threshold, radius, sigma, mix = params
    n, h, w, _ = x.shape
    draws = _per_image(rngs, lambda g: np.append(g.normal(mean, std, size=h * w), g.uniform(-135.0, -45.0)))
    layer = _clipped_zoom(draws[:, :-1].reshape(n, h, w, 1).astype(np.float32), zoom)
    layer[layer < threshold] = 0.0
    layer = _motion_blur(np.clip(layer, 0.0, 1.0), radius, sigma, draws[:, -1])
    x = mix * x + (1.0 - mix) * np.maximum(x, _luminance(x) * 1.5 + 0.5)
    return x + layer + layer[:, ::-1, ::-1]


def _frost(x, params, rngs):
    """image_weight x + frost_weight F with the script's weights. DEVIATION: the script blends random crops of six
    frost photographs (not shipped here); F is a seeded procedural frost texture instead (_frost_texture: ice
    needles over a fractal haze, bluish white, mean about 0.45), so frost matches CIFAR-10-C in its weights and
    overall brightness, not pixel statistics. Grayscale images get the texture's luma."""
    image_weight, frost_weight = params
    return image_weight * x + frost_weight * _frost_texture(rngs, *x.shape[1:])


_FROST_TINT = np.array([0.82, 0.9, 1.0], dtype=np.float32)


def _frost_texture(rngs, h: int, w: int, c: int) -> np.ndarray:
    """Procedural frost (N, h, w, c) in [0, 1]: a diamond-square haze (decay 1.6) plus ~h w / 24 straight ice
    needles per image (random position, direction, length 2..2 + 0.4 max(h, w), brightness 0.5..1) drawn at
    half-pixel steps, saturated (1 - exp(-2 a)), lightly blurred (std 0.5), tinted bluish white."""
    n, size = len(rngs), _plasma_size(h, w)
    needles = max(4, round(h * w / 24))
    length_max = 0.4 * max(h, w)
    draws = _per_image(rngs, lambda g: g.random(size * size - 1 + 5 * needles))
    haze = _plasma_fractal(draws[:, :size * size - 1], size, 1.6)[:, :h, :w]
    p = draws[:, size * size - 1:].reshape(n, needles, 5)
    y0, x0, angle = p[..., 0] * h, p[..., 1] * w, p[..., 2] * 2 * np.pi
    length, brightness = 2.0 + p[..., 3] * length_max, 0.5 + 0.5 * p[..., 4]
    t = 0.5 * np.arange(int(2 * (2.0 + length_max)) + 1)                          # (S,)
    rows = np.rint(y0[..., None] + t * np.sin(angle)[..., None]).astype(np.int64)  # (N, M, S)
    cols = np.rint(x0[..., None] + t * np.cos(angle)[..., None]).astype(np.int64)
    keep = (t <= length[..., None]) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat = (np.arange(n)[:, None, None] * h + rows) * w + cols
    amount = np.broadcast_to(0.5 * brightness[..., None], keep.shape)
    ice = np.bincount(flat[keep], weights=amount[keep], minlength=n * h * w).reshape(n, h, w)
    ice = _blur(1.0 - np.exp(-2.0 * ice), 0.5, mode="reflect")
    texture = np.clip(0.35 * haze + 0.15 + 0.8 * ice, 0.0, 1.0).astype(np.float32)[..., None] * _FROST_TINT
    return texture if c == 3 else _luminance(texture)


def _fog(x, params, rngs):
    """(x + strength P) max(x) / (max(x) + strength), P a diamond-square map (_plasma_fractal with the table's
    decay) of the next power-of-two side, cropped to (H, W), the same on every channel; max(x) over the image."""
    strength, decay = params
    n, h, w, _ = x.shape
    size = _plasma_size(h, w)
    fog = _plasma_fractal(_per_image(rngs, lambda g: g.random(size * size - 1)), size, decay)[:, :h, :w, None]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return ((x + strength * fog) * (peak / (peak + strength))).astype(np.float32)


def _brightness(x, c, rngs):
    """HSV value + c (clipped to 1), hue and saturation kept, in closed form: with V = max over channels, RGB
    scales by min(V + c, 1) / V (black pixels become gray min(c, 1)), which is what skimage's rgb2hsv / hsv2rgb
    round trip computes. For grayscale, V = x: min(x + c, 1)."""
    value = x.max(axis=-1, keepdims=True)
    target = np.minimum(value + np.float32(c), 1.0)
    safe = np.where(value > 0, value, 1.0)
    return np.where(value > 0, x * (target / safe), target)


def _contrast(x, c, rngs):
    """(x - m) c + m, m the per-image, per-channel mean."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * np.float32(c) + mean


def _elastic_transform(x, params, rngs):
    """The script's elastic transform, with its table entries times the image side s = min(H, W) (the script's
    IMSIZE = 32): a random affine warp (the triangle centre + (s//3)(1, 1), (1, -1), (-1, -1) moved by
    U(-affine, affine), inverse-mapped, bilinear, borders mirrored as cv2.warpAffine with REFLECT_101), then a
    displacement field alpha G_sigma * U(-1, 1) per axis (Gaussian truncated at 3 sigma, 'reflect' borders),
    resampled bilinearly with 'reflect' borders (as scipy's map_coordinates, order 1)."""
    n, h, w, _ = x.shape
    side = min(h, w)
    alpha, sigma, affine = (side * f for f in params)
    draws = _per_image(rngs, lambda g: np.concatenate([g.uniform(-affine, affine, size=6),
                                                       g.uniform(-1.0, 1.0, size=2 * h * w)]))
    # affine: source points (x, y) -> moved points; dst(p) = src(M^-1 p)
    centre, square = np.array([w // 2, h // 2], dtype=np.float64), side // 3
    source = centre + square * np.array([[1, 1], [1, -1], [-1, -1]], dtype=np.float64)  # (3, 2)
    moved = source + draws[:, :6].reshape(n, 3, 2)
    design = np.hstack([source, np.ones((3, 1))])                                   # [x y 1] (3, 3)
    forward = np.linalg.solve(design, moved).transpose(0, 2, 1)                     # (N, 2, 3)
    linear_inv = np.linalg.inv(forward[:, :, :2])                                   # (N, 2, 2)
    grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    px = grid_x[None] - forward[:, 0, 2, None, None]
    py = grid_y[None] - forward[:, 1, 2, None, None]
    src_x = linear_inv[:, 0, 0, None, None] * px + linear_inv[:, 0, 1, None, None] * py
    src_y = linear_inv[:, 1, 0, None, None] * px + linear_inv[:, 1, 1, None, None] * py
    x = _bilinear_sample(x, src_y, src_x, mode="mirror")
    # elastic displacement
    fields = draws[:, 6:].reshape(n, 2, h, w)
    if sigma > 0:
        fields = ndimage.gaussian_filter(fields, (0, 0, sigma, sigma), mode="reflect", truncate=3.0)
    fields = fields * alpha
    return _bilinear_sample(x, grid_y[None] + fields[:, 1], grid_x[None] + fields[:, 0], mode="reflect")


def _pixelate(x, c, rngs):
    """Pillow BOX resize to (int(H c), int(W c)) and back (float, no 8-bit rounding)."""
    _, h, w, _ = x.shape
    rows = _box_resize_matrix(int(h * c), h) @ _box_resize_matrix(h, int(h * c))
    cols = _box_resize_matrix(int(w * c), w) @ _box_resize_matrix(w, int(w * c))
    return _apply_axis_map(_apply_axis_map(x, rows, axis=1), cols, axis=2)


def _jpeg_compression(x, quality, rngs):
    """Pillow JPEG at the table's quality (defaults otherwise: 4:2:0 chroma for RGB; grayscale as mode 'L'), from
    the image rounded to 8 bits, decoded back to [0, 1]."""
    pixels = np.rint(x * 255.0).astype(np.uint8)
    out = np.empty_like(x)
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer), dtype=np.float32) / np.float32(255.0)
        out[i] = decoded.reshape(image.shape)
    return out


_IMPLEMENTATIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
_RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
                     "frost", "fog", "elastic_transform"})
# Smallest image side each corruption can work on: glass blur shuffles rows/columns 2..side-1, elastic's affine
# triangle (corners side // 3 from the centre) collapses below 3 pixels, pixelate needs int(side * 0.65) >= 1;
# blurs and contrast leave a single pixel unchanged.
_MIN_SIDE = {name: 1 for name in CORRUPTIONS}
_MIN_SIDE.update({"glass_blur": 3, "elastic_transform": 3, "pixelate": 2, "defocus_blur": 2, "zoom_blur": 2,
                  "contrast": 2})
assert set(_IMPLEMENTATIONS) == set(CORRUPTIONS) == set(CIFAR_PARAMETERS)
assert sorted(sum(FAMILIES.values(), ())) == sorted(CORRUPTIONS)
