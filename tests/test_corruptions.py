"""Natural corruptions (distill/corruptions.py): every corruption x severity on RGB and grayscale keeps shape,
dtype and range and changes the image; per-image seeding (subsets and chunks with their indices reproduce the full
set); harshness grows with severity; closed forms (contrast, brightness, noise statistics); the vectorized pieces
against slow, obvious references (scipy, Pillow, colorsys, literal loops of the original script); published table
values; the CIFAR-10-C .npy loader; the error messages."""
from __future__ import annotations

import colorsys
import io
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from distill import corruptions as C
from distill.corruptions import CIFAR_PARAMETERS, CORRUPTIONS, FAMILIES, corrupt, load_cifar10c

# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits():
    """Eight scikit-learn digits upscaled to 28x28 (the Fashion-MNIST size), grayscale (N, H, W) in [0, 1]."""
    from sklearn.datasets import load_digits
    images = load_digits().images[:8] / 16.0
    return np.clip(ndimage.zoom(images, (1, 3.5, 3.5), order=1), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def rgb():
    """Six smooth synthetic RGB images 32x32 with a few hard edges, values in [0.05, 0.95]."""
    rng = np.random.default_rng(7)
    smooth = ndimage.zoom(rng.random((6, 4, 4, 3)), (1, 8, 8, 1), order=3)
    smooth[:, 10:20, 12:14] = rng.random((6, 1, 1, 3))
    return np.clip(smooth * 0.8 + 0.1, 0.05, 0.95).astype(np.float32)


def _mean_change(clean, name, severity, seed=0):
    return float(np.abs(corrupt(clean, name, severity, seed=seed) - clean).mean())


# ---------------------------------------------------------------------------------------------- names, tables
def test_names_order_and_families():
    assert CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                           "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                           "elastic_transform", "pixelate", "jpeg_compression")
    assert list(FAMILIES) == ["noise", "blur", "weather", "digital"]
    assert sum(FAMILIES.values(), ()) == CORRUPTIONS
    assert all(len(CIFAR_PARAMETERS[name]) == 5 for name in CORRUPTIONS)


def test_published_cifar_table_values():
    """A few entries of make_cifar_c.py's CIFAR tables (Hendrycks & Dietterich 2019), not ImageNet-C's."""
    assert CIFAR_PARAMETERS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)     # ImageNet: .08 ... .38
    assert CIFAR_PARAMETERS["shot_noise"] == (500, 250, 100, 75, 50)                # ImageNet: 60 ... 3
    assert CIFAR_PARAMETERS["impulse_noise"] == (0.01, 0.02, 0.03, 0.05, 0.07)
    assert CIFAR_PARAMETERS["defocus_blur"][0] == (0.3, 0.4) and CIFAR_PARAMETERS["defocus_blur"][4] == (1.5, 0.1)
    assert CIFAR_PARAMETERS["glass_blur"] == ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
    assert CIFAR_PARAMETERS["motion_blur"] == ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
    assert CIFAR_PARAMETERS["snow"][4] == (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)
    assert CIFAR_PARAMETERS["frost"] == ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
    assert CIFAR_PARAMETERS["fog"] == ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
    assert CIFAR_PARAMETERS["brightness"] == (0.05, 0.1, 0.15, 0.2, 0.3)
    assert CIFAR_PARAMETERS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert CIFAR_PARAMETERS["elastic_transform"][1] == (0.05, 0.2, 0.07)           # x IMSIZE = 32
    assert CIFAR_PARAMETERS["pixelate"] == (0.95, 0.9, 0.85, 0.75, 0.65)            # ImageNet: 0.6 ... 0.25
    assert CIFAR_PARAMETERS["jpeg_compression"] == (80, 65, 58, 50, 40)             # ImageNet: 25 ... 7
    # the script's zoom factors np.arange(1, stop, 0.01): float rounding keeps the stop for 1.06 and 1.11
    counts = [len(np.arange(1, stop, 0.01)) for stop in CIFAR_PARAMETERS["zoom_blur"]]
    assert counts == [7, 12, 16, 21, 26]


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("layout", ["rgb", "gray", "gray_channel"])
def test_every_severity_keeps_shape_dtype_range_and_changes_the_image(name, layout, digits, rgb):
    clean = {"rgb": rgb[:3], "gray": digits[:3], "gray_channel": digits[:3, ..., None]}[layout]
    for severity in range(1, 6):
        out = corrupt(clean, name, severity)
        assert out.shape == clean.shape and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
        assert not np.array_equal(out, clean), f"{name} severity {severity} left the images unchanged"


def test_other_sizes_and_non_square_images():
    rng = np.random.default_rng(3)
    for shape in [(2, 8, 8), (2, 24, 40, 3), (1, 64, 64, 3)]:
        clean = rng.random(shape).astype(np.float32)
        for name in CORRUPTIONS:
            out = corrupt(clean, name, 3)
            assert out.shape == clean.shape and 0.0 <= out.min() and out.max() <= 1.0


def test_float64_input_and_empty_batch(rgb):
    assert corrupt(rgb[:2].astype(np.float64), "fog", 2).dtype == np.float32
    assert np.array_equal(corrupt(rgb[:2].astype(np.float64), "fog", 2), corrupt(rgb[:2], "fog", 2))
    empty = corrupt(np.zeros((0, 32, 32, 3)), "snow", 1)
    assert empty.shape == (0, 32, 32, 3) and empty.dtype == np.float32


# ---------------------------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seeded_subsets_and_chunks_reproduce_the_full_set(name, rgb, monkeypatch):
    full = corrupt(rgb, name, 4, seed=5)
    assert np.array_equal(corrupt(rgb, name, 4, seed=5), full)
    subset = np.array([4, 1, 3])
    assert np.array_equal(corrupt(rgb[subset], name, 4, seed=5, indices=subset), full[subset])
    assert np.array_equal(corrupt(rgb[2:5], name, 4, seed=5, indices=np.arange(2, 5)), full[2:5])
    monkeypatch.setattr(C, "_CHUNK", 4)                       # internal blocks are invisible too
    assert np.array_equal(corrupt(rgb, name, 4, seed=5), full)
    other = corrupt(rgb, name, 4, seed=6)
    if name in C._RANDOM:
        assert not np.array_equal(other, full)
        # an image's stream depends on its index: the same image at another index is corrupted differently
        assert not np.array_equal(corrupt(rgb[:1], name, 4, seed=5, indices=[1]), full[:1])
    else:
        assert np.array_equal(other, full)


def test_streams_differ_between_severities_and_images():
    clean = np.full((2, 16, 16), 0.5, dtype=np.float32)
    noise = [corrupt(clean, "gaussian_noise", s) - clean for s in (1, 2)]
    assert not np.allclose(noise[0][0] / 0.04, noise[1][0] / 0.06)     # not the same normals rescaled
    assert not np.allclose(noise[0][0], noise[0][1])                     # each image its own stream


# ---------------------------------------------------------------------------------------------- harshness
MONOTONE = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "zoom_blur", "fog", "brightness",
            "contrast", "pixelate", "jpeg_compression"]


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in ("elastic_transform", "frost")])
def test_severity_five_is_clearly_harsher_than_one(name, digits, rgb):
    for clean in (digits, rgb):
        assert _mean_change(clean, name, 5) > 1.25 * _mean_change(clean, name, 1)


@pytest.mark.parametrize("name", MONOTONE)
def test_harshness_non_decreasing_where_the_table_is_monotone(name, digits, rgb):
    # pixelate's change depends on where edges fall on the resize grid (the synthetic 2-pixel bar changes more at
    # 32 -> 28 than at 32 -> 27): it is held on images with detail at every position (white noise) instead
    sets = (digits, rgb) if name != "pixelate" else [np.random.default_rng(s).random(shape, dtype=np.float32)
                                                      for s, shape in enumerate([(6, 28, 28), (6, 32, 32, 3)])]
    for clean in sets:
        change = [_mean_change(clean, name, s) for s in range(1, 6)]
        assert all(b >= 0.97 * a for a, b in zip(change, change[1:])), change


def test_motion_blur_length_grows_but_severities_3_and_4_share_a_kernel():
    """The blur length (mean tap distance of the one-sided kernel) is non-decreasing over the table; (6, 2) and
    (8, 2) differ only in taps beyond 3 sigma (weights < 1e-7), so severities 3 and 4 differ only by their random
    angles (a quirk of the published table)."""
    lengths = []
    for radius, sigma in CIFAR_PARAMETERS["motion_blur"]:
        taps = np.arange(2 * math.ceil(radius) + 1)
        weights = np.exp(-taps ** 2 / (2 * sigma ** 2))
        lengths.append(float((weights * taps).sum() / weights.sum()))
    assert all(b >= a - 1e-9 for a, b in zip(lengths, lengths[1:])) and abs(lengths[3] - lengths[2]) < 1e-6
    edge = np.zeros((1, 16, 16, 1), dtype=np.float32)
    edge[:, :, 8:] = 1.0
    s3, s4 = (C._motion_blur(edge, r, sg, np.array([10.0])) for r, sg in CIFAR_PARAMETERS["motion_blur"][2:4])
    np.testing.assert_allclose(s3, s4, atol=1e-6)


def test_frost_signal_to_texture_ratio_falls_with_severity(rgb):
    """frost = a x + b F: the clean image's weight a / b falls (5, 3.3, 2.25, 2.1, 1.7), so the corrupted image's
    correlation with the clean one falls (its mean change does not: a < 1 darkens while b F brightens)."""
    def correlation(s):
        out = corrupt(rgb, "frost", s).reshape(len(rgb), -1)
        clean = rgb.reshape(len(rgb), -1)
        return np.mean([np.corrcoef(o, c)[0, 1] for o, c in zip(out, clean)])
    values = [correlation(s) for s in range(1, 6)]
    assert all(b <= a + 0.01 for a, b in zip(values, values[1:])) and values[4] < values[0] - 0.1, values


def test_elastic_table_trades_affine_warp_for_local_displacement(digits):
    """The CIFAR table shrinks the affine jitter (0.08 -> 0.03 of the side) while the elastic field grows from 0:
    severity 1 is a pure affine warp, so the mean pixel change falls with severity (as published); the local
    displacement, the affine part removed, grows."""
    change = [_mean_change(digits, "elastic_transform", s) for s in range(1, 6)]
    assert change[0] > change[4]
    rngs = lambda s: C._image_rngs(0, "elastic_transform", s, np.arange(len(digits)))   # noqa: E731
    local = []
    for s in range(1, 6):
        alpha, sigma, _ = CIFAR_PARAMETERS["elastic_transform"][s - 1]
        out = C._elastic_transform(digits[..., None], (alpha, sigma, 0.0), rngs(s))
        local.append(float(np.abs(out[..., 0] - digits).mean()))
    assert local[0] < 1e-6 and all(b > a for a, b in zip(local[:3], local[1:4])) and local[4] > 0.02, local


# ---------------------------------------------------------------------------------------------- closed forms
def test_contrast_closed_form(rgb, digits):
    for clean in (rgb, digits):
        for s, c in enumerate(CIFAR_PARAMETERS["contrast"], start=1):
            mean = clean.mean(axis=(1, 2), keepdims=True)
            np.testing.assert_allclose(corrupt(clean, "contrast", s), np.clip((clean - mean) * c + mean, 0, 1),
                                       atol=1e-6)


def test_brightness_matches_the_hsv_round_trip(rgb):
    """Against colorsys, pixel by pixel: V <- min(V + c, 1) in HSV, hue and saturation kept."""
    clean = rgb[:2, ::4, ::4].copy()
    clean[0, 0, 0] = 0.0                                    # black pixel: becomes gray c
    clean[1, 0, 0] = (0.3, 0.3, 0.3)                        # gray pixel stays gray
    for s, c in enumerate(CIFAR_PARAMETERS["brightness"], start=1):
        expected = np.empty_like(clean)
        for index in np.ndindex(clean.shape[:3]):
            h, sat, v = colorsys.rgb_to_hsv(*clean[index].astype(np.float64))
            expected[index] = colorsys.hsv_to_rgb(h, sat, min(v + c, 1.0))
        np.testing.assert_allclose(corrupt(clean, "brightness", s), expected, atol=1e-6)
    gray = rgb[:2, :, :, 0]
    np.testing.assert_allclose(corrupt(gray, "brightness", 5), np.minimum(gray + 0.3, 1), atol=1e-6)


def test_gaussian_noise_statistics():
    clean = np.full((40, 32, 32, 3), 0.5, dtype=np.float32)
    for s, c in enumerate(CIFAR_PARAMETERS["gaussian_noise"], start=1):
        noise = corrupt(clean, "gaussian_noise", s) - clean
        assert abs(noise.mean()) < 0.002 and abs(noise.std() / c - 1) < 0.02


def test_shot_noise_statistics():
    clean = np.full((40, 32, 32, 3), 0.5, dtype=np.float32)
    for s, c in enumerate(CIFAR_PARAMETERS["shot_noise"], start=1):
        out = corrupt(clean, "shot_noise", s).astype(np.float64)
        assert abs(out.mean() - 0.5) < 0.003 and abs(out.var() / (0.5 / c) - 1) < 0.05
        assert np.allclose(out * c, np.round(out * c), atol=1e-3)        # counts / c


def test_impulse_noise_statistics():
    clean = np.full((40, 32, 32, 3), 0.5, dtype=np.float32)
    for s, c in enumerate(CIFAR_PARAMETERS["impulse_noise"], start=1):
        out = corrupt(clean, "impulse_noise", s)
        hit = out != 0.5
        assert set(np.unique(out[hit])) <= {0.0, 1.0}
        assert abs(hit.mean() - c) < 4 * math.sqrt(c / hit.size) + 1e-4
        assert abs((out[hit] == 1.0).mean() - 0.5) < 0.05


def test_fog_closed_form_given_the_plasma_map(rgb):
    strength, decay = CIFAR_PARAMETERS["fog"][2]
    rngs = C._image_rngs(0, "fog", 3, np.arange(len(rgb)))
    plasma = C._plasma_fractal(np.stack([g.random(32 * 32 - 1) for g in rngs]), 32, decay)
    assert plasma.min(axis=(1, 2)).max() == 0.0 and np.allclose(plasma.max(axis=(1, 2)), 1.0)
    peak = rgb.max(axis=(1, 2, 3), keepdims=True)
    expected = np.clip((rgb + strength * plasma[..., None]) * peak / (peak + strength), 0, 1)
    np.testing.assert_allclose(corrupt(rgb, "fog", 3), expected, atol=1e-6)


def test_frost_blends_the_texture_with_the_table_weights(rgb, digits):
    for s, (a, b) in enumerate(CIFAR_PARAMETERS["frost"], start=1):
        rngs = C._image_rngs(0, "frost", s, np.arange(len(rgb)))
        texture = C._frost_texture(rngs, 32, 32, 3)
        assert 0.3 < texture.mean() < 0.6 and texture.min() >= 0 and texture.max() <= 1
        np.testing.assert_allclose(corrupt(rgb, "frost", s), np.clip(a * rgb + b * texture, 0, 1), atol=1e-6)
    gray = corrupt(digits, "frost", 1)                           # one-channel texture = the RGB texture's luma
    texture = C._frost_texture(C._image_rngs(0, "frost", 1, np.arange(len(digits))), 28, 28, 3) @ C._LUMA
    np.testing.assert_allclose(gray, np.clip(digits + 0.2 * texture, 0, 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------- references
def _script_clipped_zoom(img, zoom):
    """make_cifar_c's clipped_zoom, written plainly with scipy.ndimage.zoom (square (H, H, C) images)."""
    h = img.shape[0]
    crop = int(np.ceil(h / zoom))
    top = (h - crop) // 2
    out = ndimage.zoom(img[top:top + crop, top:top + crop], (zoom, zoom, 1), order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim:trim + h, trim:trim + h]


@pytest.mark.parametrize("side", [8, 28, 32])
def test_clipped_zoom_against_scipy(side):
    img = np.random.default_rng(side).random((1, side, side, 2)).astype(np.float32)
    for zoom in list(np.arange(1, 1.26, 0.01)) + [1.75, 2.25]:
        np.testing.assert_allclose(C._clipped_zoom(img, float(zoom))[0], _script_clipped_zoom(img[0], zoom),
                                   atol=1e-5, err_msg=f"zoom {zoom}")


def test_zoom_blur_against_the_script(rgb):
    for s, stop in enumerate(CIFAR_PARAMETERS["zoom_blur"], start=1):
        factors = np.arange(1, stop, 0.01)
        expected = [(img + sum(_script_clipped_zoom(img, z) for z in factors)) / (len(factors) + 1) for img in rgb]
        np.testing.assert_allclose(corrupt(rgb, "zoom_blur", s), np.clip(expected, 0, 1), atol=1e-5)


@pytest.mark.parametrize("mode,scipy_mode", [("reflect", "reflect"), ("mirror", "mirror")])
def test_bilinear_sampler_against_map_coordinates(mode, scipy_mode):
    rng = np.random.default_rng(0)
    x = rng.random((2, 9, 11, 3)).astype(np.float32)
    rows = rng.uniform(-3, 12, size=(2, 9, 11))
    cols = rng.uniform(-3, 14, size=(2, 9, 11))
    out = C._bilinear_sample(x, rows, cols, mode)
    for n in range(2):
        for c in range(3):
            ref = ndimage.map_coordinates(x[n, :, :, c].astype(np.float64), [rows[n], cols[n]], order=1,
                                          mode=scipy_mode)
            np.testing.assert_allclose(out[n, :, :, c], ref, atol=1e-5)


def test_elastic_transform_against_scipy_reference(rgb):
    """Affine step as cv2.warpAffine (inverse map, REFLECT_101 = scipy 'mirror'), then the displacement field
    resampled with scipy.ndimage.map_coordinates (order 1, 'reflect'), image by image."""
    s = 4
    alpha, sigma, affine = (32 * f for f in CIFAR_PARAMETERS["elastic_transform"][s - 1])
    out = corrupt(rgb, "elastic_transform", s)
    for i, (g, img) in enumerate(zip(C._image_rngs(0, "elastic_transform", s, np.arange(len(rgb))), rgb)):
        moves = g.uniform(-affine, affine, size=6).reshape(3, 2)
        field = g.uniform(-1, 1, size=2 * 32 * 32).reshape(2, 32, 32)
        pts1 = np.array([[26, 26], [26, 6], [6, 6]], dtype=np.float64)           # centre 16 +- 32 // 3
        pts2 = pts1 + moves
        full = np.linalg.lstsq(np.hstack([pts1, np.ones((3, 1))]), pts2, rcond=None)[0].T   # (2, 3) forward
        yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
        src = np.linalg.inv(full[:, :2]) @ np.stack([xx.ravel() - full[0, 2], yy.ravel() - full[1, 2]])
        warped = np.stack([ndimage.map_coordinates(img[..., c].astype(np.float64), [src[1], src[0]], order=1,
                                                   mode="mirror").reshape(32, 32) for c in range(3)], axis=-1)
        dx, dy = (ndimage.gaussian_filter(f, sigma, mode="reflect", truncate=3) * alpha for f in field)
        expected = np.stack([ndimage.map_coordinates(warped[..., c], [yy + dy, xx + dx], order=1, mode="reflect")
                             for c in range(3)], axis=-1)
        np.testing.assert_allclose(out[i], np.clip(expected, 0, 1), atol=2e-5)


def test_pixelate_against_pillow(rgb, digits):
    for clean in (rgb, digits[..., None]):
        h = clean.shape[1]
        for s, c in enumerate(CIFAR_PARAMETERS["pixelate"], start=1):
            small = int(h * c)
            expected = np.empty_like(clean)
            for index in np.ndindex(clean.shape[0], clean.shape[3]):
                image = Image.fromarray(clean[index[0], :, :, index[1]], mode="F")
                image = image.resize((small, small), Image.Resampling.BOX).resize((h, h), Image.Resampling.BOX)
                expected[index[0], :, :, index[1]] = np.asarray(image)
            np.testing.assert_allclose(corrupt(clean, "pixelate", s), np.clip(expected, 0, 1), atol=1e-5)


def test_jpeg_against_pillow(rgb, digits):
    for clean, mode in ((rgb, "RGB"), (digits, "L")):
        pixels = np.rint(clean * 255).astype(np.uint8)
        for s, quality in enumerate(CIFAR_PARAMETERS["jpeg_compression"], start=1):
            expected = []
            for image in pixels:
                buffer = io.BytesIO()
                Image.fromarray(image, mode=mode).save(buffer, "JPEG", quality=quality)
                expected.append(np.asarray(Image.open(buffer)) / 255.0)
            np.testing.assert_allclose(corrupt(clean, "jpeg_compression", s), expected, atol=1e-6)


def _motion_blur_loop(img, radius, sigma, angle):
    """ImageMagick's MotionBlurImage kernel, pixel by pixel: one-sided Gaussian taps along the angle, edge pixels
    repeated."""
    width = 2 * math.ceil(radius) + 1
    kernel = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(width)]
    total = sum(kernel)
    h, w, _ = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            for i, k in enumerate(kernel):
                dx = math.ceil(i * math.cos(math.radians(angle)) - 0.5)
                dy = math.ceil(i * math.sin(math.radians(angle)) - 0.5)
                out[y, x] += k / total * img[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
    return out


def test_motion_blur_against_a_pixel_loop(rgb):
    s = 5
    radius, sigma = CIFAR_PARAMETERS["motion_blur"][s - 1]
    clean = rgb[:2, :16, :16]
    out = corrupt(clean, "motion_blur", s)
    for g, img, got in zip(C._image_rngs(0, "motion_blur", s, np.arange(2)), clean, out):
        np.testing.assert_allclose(got, np.clip(_motion_blur_loop(img, radius, sigma, g.uniform(-45, 45)), 0, 1),
                                   atol=1e-5)
    # a horizontal blur of a vertical edge: the lit side bleeds only from one direction (one-sided kernel)
    edge = np.zeros((1, 9, 9, 1), dtype=np.float32)
    edge[:, :, 5:] = 1.0
    blurred = C._motion_blur(edge, 6, 1.0, np.array([0.0]))[0, 4, :, 0]
    assert np.all(blurred[5:] == 1.0) and 0 < blurred[4] < 1 and blurred[3] > 0.01 and blurred[0] < 1e-5


def test_defocus_blur_against_a_loop(rgb):
    for s, (radius, alias) in enumerate(CIFAR_PARAMETERS["defocus_blur"], start=1):
        kernel = C._disk_kernel(radius, alias)
        assert abs(kernel.sum() - 1) < 1e-12 and np.allclose(kernel, kernel.T) and np.allclose(kernel, kernel[::-1])
        if radius < 1:                       # single-pixel disk: a 3x3 Gaussian of std alias
            g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias ** 2))
            np.testing.assert_allclose(kernel, np.outer(g, g) / np.outer(g, g).sum())
        half = kernel.shape[0] // 2
        padded = np.pad(rgb[:2], ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
        expected = np.zeros(rgb[:2].shape)
        for a in range(kernel.shape[0]):
            for b in range(kernel.shape[1]):
                expected += kernel[a, b] * padded[:, a:a + 32, b:b + 32]
        np.testing.assert_allclose(corrupt(rgb[:2], "defocus_blur", s), np.clip(expected, 0, 1), atol=1e-5)


def _glass_blur_script(img, sigma, iterations, offsets):
    """make_cifar_c's glass blur on one (H, W, C) image, literally: blur, the per-pixel loop with its tuple
    assignment (numpy views: a copy, not a swap), blur. offsets (iterations, 2, H-2, W-2) = (dy, dx)."""
    h, w, _ = img.shape
    x = ndimage.gaussian_filter(img, (sigma, sigma, 0), mode="nearest")
    for it in range(iterations):
        for r in range(h - 1, 1, -1):
            for c in range(w - 1, 1, -1):
                dy, dx = offsets[it, 0, r - 2, c - 2], offsets[it, 1, r - 2, c - 2]
                x[r, c], x[r + dy, c + dx] = x[r + dy, c + dx], x[r, c]
    return ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest")


@pytest.mark.parametrize("layout", ["rgb", "gray"])
def test_glass_blur_against_the_script_loop(layout, rgb, digits):
    clean = rgb[:3] if layout == "rgb" else digits[:3, ..., None]
    h, w = clean.shape[1:3]
    for s in (1, 5):
        sigma, _, iterations = CIFAR_PARAMETERS["glass_blur"][s - 1]
        out = corrupt(clean, "glass_blur", s)
        for g, img, got in zip(C._image_rngs(0, "glass_blur", s, np.arange(3)), clean, out):
            offsets = g.integers(-1, 1, size=(iterations, 2, h - 2, w - 2))
            np.testing.assert_allclose(got, np.clip(_glass_blur_script(img.copy(), sigma, iterations, offsets), 0, 1),
                                       atol=1e-6)


def test_snow_pieces(rgb, digits):
    """Snow = mixed image + motion-blurred thresholded layer + its 180-degree rotation: with the layer removed
    (threshold above every value) only the gray mixing is left."""
    params = list(CIFAR_PARAMETERS["snow"][0])
    params[3] = 1e9
    rngs = lambda n: C._image_rngs(0, "snow", 1, np.arange(n))   # noqa: E731
    mix = params[6]
    gray = (rgb @ C._LUMA)[..., None]
    np.testing.assert_allclose(C._snow(rgb, params, rngs(len(rgb))),
                               mix * rgb + (1 - mix) * np.maximum(rgb, 1.5 * gray + 0.5), atol=1e-6)
    g1 = digits[..., None]
    np.testing.assert_allclose(C._snow(g1, params, rngs(len(g1))),
                               mix * g1 + (1 - mix) * np.maximum(g1, 1.5 * g1 + 0.5), atol=1e-6)
    black = corrupt(np.zeros((2, 32, 32)), "snow", 5)          # (1 - mix) 0.5 + L + rot180(L)
    np.testing.assert_allclose(black, black[:, ::-1, ::-1], atol=1e-6)
    assert black.min() >= 0.5 * (1 - 0.8) - 1e-6 and black.max() > 0.5


# ---------------------------------------------------------------------------------------------- loader
def _fake_cifar10c(folder, names=("fog",), per_severity=4, shape=(32, 32, 3)):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for name in names:
        images = rng.integers(0, 256, size=(5 * per_severity,) + shape, dtype=np.uint8)
        images[:, 0, 0, 0] = np.repeat(np.arange(1, 6), per_severity)      # severity stamp
        np.save(folder / f"{name}.npy", images)
    np.save(folder / "labels.npy", np.tile(np.arange(per_severity) % 10, 5).astype(np.uint8))
    return folder


def test_loader_slices_severities_and_labels(tmp_path):
    folder = _fake_cifar10c(tmp_path / "CIFAR-10-C", names=("fog", "saturate"))
    raw = np.load(folder / "fog.npy")
    for s in range(1, 6):
        x, y = load_cifar10c(folder, "fog", s)
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x, raw[(s - 1) * 4:s * 4] / np.float32(255))
        assert np.all(np.rint(x[:, 0, 0, 0] * 255) == s)
        np.testing.assert_array_equal(y, np.arange(4))
    x, y = load_cifar10c(str(folder), "fog", 2, limit=3)
    assert x.shape == (3, 32, 32, 3) and y.tolist() == [0, 1, 2]
    assert load_cifar10c(folder, "fog", 5, limit=100)[0].shape[0] == 4
    assert load_cifar10c(folder, "saturate", 1)[0].shape == (4, 32, 32, 3)      # released extra corruption


def test_loader_errors(tmp_path):
    folder = _fake_cifar10c(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10c(tmp_path / "missing", "fog", 1)
    with pytest.raises(FileNotFoundError, match="snow.npy not found"):
        load_cifar10c(folder, "snow", 1)
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*gaussian_noise"):
        load_cifar10c(folder, "fogg", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(folder, "fog", 6)
    with pytest.raises(ValueError, match="limit"):
        load_cifar10c(folder, "fog", 1, limit=0)
    np.save(folder / "frost.npy", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"frost.npy: expected uint8 images of shape \(5 n, H, W, 3\)"):
        load_cifar10c(folder, "frost", 1)
    np.save(folder / "frost.npy", np.zeros((20, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        load_cifar10c(folder, "frost", 1)
    np.save(folder / "frost.npy", np.zeros((19, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="5 n"):
        load_cifar10c(folder, "frost", 1)
    np.save(folder / "frost.npy", np.zeros((10, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="labels.npy: expected 10 integer labels"):
        load_cifar10c(folder, "frost", 1)
    np.save(folder / "snow.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_cifar10c(folder, "snow", 1)
    (folder / "zoom_blur.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_cifar10c(folder, "zoom_blur", 1)


# ---------------------------------------------------------------------------------------------- errors
def test_error_messages(rgb):
    with pytest.raises(ValueError, match="unknown corruption 'speckle_noise'; valid names: gaussian_noise, "
                                         "shot_noise, .*jpeg_compression"):
        corrupt(rgb, "speckle_noise", 1)
    for severity in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
            corrupt(rgb, "fog", severity)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\], got \[\d+, \d+\].*1/255"):
        corrupt((rgb * 255).astype(np.uint8), "fog", 1)
    bad = rgb.copy()
    bad[0, 0, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"\[-0.1, "):
        corrupt(bad, "fog", 1)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        corrupt(bad, "fog", 1)
    for shape in [(32, 32), (2, 32, 32, 2), (2, 32, 32, 4), (1, 2, 32, 32, 3)]:
        with pytest.raises(ValueError, match=r"shape \(N, H, W\) or \(N, H, W, C\) with C in \{1, 3\}"):
            corrupt(np.zeros(shape), "fog", 1)
    with pytest.raises(ValueError, match="real float array"):
        corrupt(np.zeros((1, 8, 8), dtype=complex), "fog", 1)
    with pytest.raises(ValueError, match="glass_blur needs images of at least 3x3 pixels, got 2x2"):
        corrupt(np.zeros((1, 2, 2)), "glass_blur", 1)
    with pytest.raises(ValueError, match="elastic_transform needs images of at least 3x3"):
        corrupt(np.zeros((1, 2, 9, 3)), "elastic_transform", 1)
    with pytest.raises(ValueError, match=r"indices must be an integer array of shape \(6,\)"):
        corrupt(rgb, "fog", 1, indices=np.arange(5))
    with pytest.raises(ValueError, match="indices must be an integer array"):
        corrupt(rgb, "fog", 1, indices=np.linspace(0, 1, 6))
    with pytest.raises(ValueError, match="indices must be non-negative"):
        corrupt(rgb, "fog", 1, indices=np.arange(-1, 5))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        corrupt(rgb, "fog", 1, seed=-1)
