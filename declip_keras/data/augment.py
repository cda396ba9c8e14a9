"""The released image augmentations and evaluation preprocessing, in TF image ops.

Named training augmentations: the two of the released DeCLIP configs and one
variant of them.

- `"mocov2"` (DeCLIP's): RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)),
  colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2,
  Gaussian blur with sigma ~ U(0.1, 2.0) with p=0.5, horizontal flip,
  ImageNet mean/std.
- `"mocov2-noflip"`: the same without the horizontal flip, for data whose
  mirror image means something else (digits, letters, "left" and "right").
- `"crop"` (the plain-CLIP baseline's, `STANDARD_SLIP` in the released code):
  RandomResizedCrop(scale=(0.5, 1), ratio=(3/4, 4/3)) and ImageNet mean/std,
  nothing else.

Every draw comes from stateless random ops seeded per element, so the two
views of one image differ and a pipeline is reproducible for a given seed.
Colour jitter and grayscale are fused into one affine colour map per view
(see `_jitter_matrix`): brightness, contrast, saturation and hue apply in that
fixed order, where torchvision shuffles the order per image, the hue shift
rotates YIQ chroma rather than HSV hue, and the result is clipped once.

A view is made in two halves: `random_crop` (decode-side geometry) and the
photometric step, drawn as a short parameter row by `photometric_params`. The
host applies it with `apply_photometric`, or, with device-side augmentation,
ships the crop and the row and the model applies it on the accelerator
(`declip_keras.models.layers.PhotometricAugmentation`, the same arithmetic batched in
`keras.ops`).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from declip_keras.data.image_constants import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUMA,
    blur_radius,
)


def decode_rgb(image_bytes):
    """JPEG/PNG/WebP/GIF/BMP bytes, any colour mode -> uint8 `[H, W, 3]`."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def normalize(image):
    """float `[..., 3]` in [0, 1] -> ImageNet-normalised float32."""
    return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)

# Inverted once here rather than for every view in the tf.data map.
_YIQ_TO_RGB = np.linalg.inv(np.array(_RGB_TO_YIQ)).astype(np.float32)


def _gray_matrix():
    """3x3 map that replaces each channel by the luma."""
    return tf.tile(tf.constant([LUMA]), [3, 1])


def _jitter_matrix(seed, strength: float = 0.4, hue: float = 0.1):
    """Brightness, contrast, saturation and hue as one affine colour map.

    Returns `(matrix, contrast_mix, brightness)`: the view becomes
    `clip(matrix @ rgb + (1 - contrast_mix) * brightness * mean_luma)`. Each
    step is linear in RGB: brightness scales, contrast blends with the mean
    luma, saturation blends with the pixel's luma, and the hue shift rotates
    the chroma plane of YIQ (torchvision shifts the H of HSV; the two agree
    closely for the small shifts used). One clip at the end replaces
    torchvision's clip after every step.
    """
    low, high = 1.0 - strength, 1.0 + strength
    factors = tf.random.stateless_uniform([4], seed, 0.0, 1.0)
    brightness = low + (high - low) * factors[0]
    contrast = low + (high - low) * factors[1]
    saturation = low + (high - low) * factors[2]
    angle = (-hue + 2 * hue * factors[3]) * 2 * math.pi
    to_yiq = tf.constant(_RGB_TO_YIQ)
    cos, sin = tf.cos(angle), tf.sin(angle)
    rotation = tf.stack(
        [
            tf.constant([1.0, 0.0, 0.0]),
            tf.stack([0.0, cos, -sin]),
            tf.stack([0.0, sin, cos]),
        ]
    )
    hue_map = tf.constant(_YIQ_TO_RGB) @ rotation @ to_yiq
    saturation_map = saturation * tf.eye(3) + (1 - saturation) * _gray_matrix()
    return hue_map @ saturation_map * (contrast * brightness), contrast, brightness


def _colour_params(seed):
    """Colour jitter (p=0.8) and grayscale (p=0.2) as `(matrix, luma_coefficient)`.

    The view becomes `matrix @ rgb + luma_coefficient * mean_luma`, clipped.
    Grayscale of the gray offset is the same offset, so it composes simply.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    draws = tf.random.stateless_uniform([2], seeds[0])
    jitter, contrast, brightness = _jitter_matrix(seeds[1])
    apply_jitter = draws[0] < 0.8
    matrix = tf.where(apply_jitter, jitter, tf.eye(3))
    coefficient = tf.where(apply_jitter, (1 - contrast) * brightness, 0.0)
    matrix = tf.where(draws[1] < 0.2, _gray_matrix() @ matrix, matrix)
    return matrix, coefficient


def photometric_params(seed, size: int, augmentation: str = "mocov2"):
    """Draws a view's photometric parameters (the layout of
    `declip_keras.data.batch_format.PHOTOMETRIC_SIZE`): float32 `[12]`.

    `seed` is the view's seed as given to `random_view`; for `"crop"` the
    parameters only normalise.
    """
    _check(augmentation)
    seeds = tf.random.experimental.stateless_split(seed, 8)
    if augmentation == "crop":
        matrix, coefficient = tf.eye(3), tf.constant(0.0)
        sigma, flip = tf.constant(0.0), tf.constant(0.0)
    else:
        matrix, coefficient = _colour_params(seeds[1])
        # sigma is in pixels of a 224-px view, as in the released configs;
        # scaled with the view, a small preset blurs as much of the image.
        sigma = tf.random.stateless_uniform([], seeds[4], 0.1, 2.0) * (size / 224.0)
        blur = tf.random.stateless_uniform([], seeds[5]) < 0.5
        sigma = tf.where(blur, sigma, 0.0)
        flip = tf.cast(tf.random.stateless_uniform([], seeds[6]) < 0.5, tf.float32)
        if augmentation == "mocov2-noflip":
            flip = tf.constant(0.0)
    # Normalising is linear too, so it folds into the colour map.
    matrix = matrix / tf.constant(IMAGENET_STD)[:, None]
    return tf.concat([tf.reshape(matrix, [9]), tf.stack([coefficient, sigma, flip])], 0)


def _blur_matrix(size: int, sigma, radius: int):
    """`[size, size]` matrix of a 1-D Gaussian blur with reflect padding.

    Row `i` holds the kernel taps of output pixel `i`; taps that fall outside
    the image are reflected back onto the pixels they mirror.
    """
    offsets = tf.range(-radius, radius + 1)
    kernel = tf.exp(-0.5 * tf.square(tf.cast(offsets, tf.float32) / sigma))
    kernel /= tf.reduce_sum(kernel)
    source = tf.abs(tf.range(size)[:, None] + offsets[None, :])
    source = tf.where(source >= size, 2 * (size - 1) - source, source)
    rows = tf.repeat(tf.range(size), 2 * radius + 1)
    indices = tf.stack([rows, tf.reshape(source, [-1])], axis=1)
    return tf.scatter_nd(indices, tf.tile(kernel, [size]), [size, size])


def _gaussian_blur(image, sigma, radius: int):
    """Separable Gaussian blur as two banded matrix products.

    On CPU this is several times faster than a depthwise convolution.
    """
    height, width = image.shape[0], image.shape[1]
    vertical = _blur_matrix(height, sigma, radius)
    horizontal = _blur_matrix(width, sigma, radius)
    image = tf.einsum("ij,jkc->ikc", vertical, image)
    return tf.einsum("ikc,lk->ilc", image, horizontal)


def apply_photometric(view, params):
    """Applies `photometric_params` to a crop; what the model's
    `PhotometricAugmentation` does to a batch on the accelerator.

    Args:
        view: float32 `[S, S, 3]` in [0, 1] (from `random_crop`).
        params: float32 `[12]`.

    Returns:
        float32 `[S, S, 3]`, ImageNet-normalised: colour map, clip, blur, flip.
    """
    mean, std = tf.constant(IMAGENET_MEAN), tf.constant(IMAGENET_STD)
    matrix = tf.reshape(params[:9], [3, 3])
    coefficient, sigma, flip = params[9], params[10], params[11]
    # The mean is linear, so the mean luma is the luma of the mean colour.
    mean_luma = tf.tensordot(tf.reduce_mean(view, [0, 1]), tf.constant(LUMA), 1)
    offset = (coefficient * mean_luma - mean) / std
    # The clip happens in normalised units, so the whole colour step reads and
    # writes the view once. Blur and flip are linear with unit gain, so
    # normalising before them gives the same view.
    view = tf.tensordot(view, tf.transpose(matrix), 1) + offset
    view = tf.clip_by_value(view, -mean / std, (1 - mean) / std)
    radius = blur_radius(view.shape[0])
    view = tf.cond(sigma > 0, lambda: _gaussian_blur(view, sigma, radius), lambda: view)
    return tf.cond(flip > 0.5, lambda: tf.reverse(view, [1]), lambda: view)


def _check(augmentation: str) -> None:
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}."
        )


def random_crop(image, seed, size: int, augmentation: str = "mocov2"):
    """The geometric half of a training view: RandomResizedCrop to `size`.

    Returns float32 `[size, size, 3]` in [0, 1]; `seed` as in `random_view`.
    """
    _check(augmentation)
    seed = tf.random.experimental.stateless_split(seed, 8)[0]
    min_scale = 0.5 if augmentation == "crop" else 0.2
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(min_scale, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.cast(tf.slice(image, begin, crop_size), tf.float32)
    # Antialiasing only changes a shrinking axis, and plain bilinear is about
    # 3x faster on CPU, so a crop that grows on both axes skips it.
    view = tf.cond(
        tf.reduce_all(crop_size[:2] <= size),
        lambda: tf.image.resize(crop, (size, size)),
        lambda: tf.image.resize(crop, (size, size), antialias=True),
    )
    return tf.clip_by_value(view / 255.0, 0.0, 1.0)


def random_view(image, seed, size: int, augmentation: str = "mocov2"):
    """One augmented training view.

    Args:
        image: uint8 `[H, W, 3]`.
        seed: int `[2]`; different seeds give independent views.
        size: output height and width.
        augmentation: `"mocov2"` (DeCLIP), `"mocov2-noflip"` or `"crop"`
            (plain CLIP).

    Returns:
        float32 `[size, size, 3]`, ImageNet-normalised.
    """
    crop = random_crop(image, seed, size, augmentation)
    if augmentation == "crop":
        # Its parameters only normalise: skip the identity colour map.
        return normalize(crop)
    return apply_photometric(crop, photometric_params(seed, size, augmentation))


def eval_view(image, size: int):
    """Resize the shorter side to `size * 256 / 224`, centre-crop `size`, normalise.

    `image` is uint8 `[H, W, 3]` or a batch `[B, H, W, 3]` of one size.
    """
    shape = tf.cast(tf.shape(image)[-3:-1], tf.float32)
    scale = (size * 256 / 224) / tf.reduce_min(shape)
    resized_shape = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    resized = tf.image.resize(
        tf.cast(image, tf.float32) / 255.0, resized_shape, antialias=True
    )
    top = (resized_shape[0] - size) // 2
    left = (resized_shape[1] - size) // 2
    crop = resized[..., top : top + size, left : left + size, :]
    crop = tf.ensure_shape(crop, [*image.shape[:-3], size, size, 3])
    return normalize(tf.clip_by_value(crop, 0.0, 1.0))
