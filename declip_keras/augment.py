"""DeCLIP's image augmentation and evaluation preprocessing, in TF image ops.

Training views: RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)), colour
jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2, Gaussian blur
with sigma ~ U(0.1, 2.0) with p=0.5, horizontal flip, ImageNet mean/std.
Every draw comes from stateless random ops seeded per element, so the two
views of one image differ and a pipeline is reproducible for a given seed.
The jitter applies brightness, contrast, saturation and hue in that fixed
order, where torchvision shuffles the order per image.
"""

from __future__ import annotations

import math

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_rgb(image_bytes):
    """JPEG/PNG/WebP/GIF/BMP bytes, any colour mode -> uint8 `[H, W, 3]`."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def normalize(image):
    """float `[..., 3]` in [0, 1] -> ImageNet-normalised float32."""
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def _grayscale(image):
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _color_jitter(image, seed, strength=0.4, hue=0.1):
    seeds = tf.random.experimental.stateless_split(seed, 4)
    low, high = 1.0 - strength, 1.0 + strength
    factor = tf.random.stateless_uniform([4], seeds[0], 0.0, 1.0)
    brightness = low + (high - low) * factor[0]
    contrast = low + (high - low) * factor[1]
    saturation = low + (high - low) * factor[2]
    hue_shift = -hue + 2 * hue * factor[3]
    image = tf.clip_by_value(image * brightness, 0.0, 1.0)
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    image = tf.clip_by_value((image - mean) * contrast + mean, 0.0, 1.0)
    gray = _grayscale(image)
    image = tf.clip_by_value((image - gray) * saturation + gray, 0.0, 1.0)
    return tf.image.adjust_hue(image, hue_shift)


def _gaussian_blur(image, sigma, radius: int):
    """Separable blur with a fixed-size kernel whose width follows `sigma`."""
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel /= tf.reduce_sum(kernel)
    horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
    vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
    x = tf.pad(
        image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT"
    )
    x = tf.nn.depthwise_conv2d(x, horizontal, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, vertical, [1, 1, 1, 1], "VALID")
    return x[0]


def _apply_with_probability(probability, seed, transform, image):
    apply = tf.random.stateless_uniform([], seed) < probability
    return tf.cond(apply, lambda: transform(image), lambda: image)


def random_view(image, seed, size: int, min_scale: float = 0.2):
    """One augmented training view.

    Args:
        image: uint8 `[H, W, 3]`.
        seed: int `[2]`; different seeds give independent views.
        size: output height and width.
        min_scale: smallest crop area fraction (DeCLIP 0.2, plain CLIP 0.5).

    Returns:
        float32 `[size, size, 3]`, ImageNet-normalised.
    """
    seeds = tf.random.experimental.stateless_split(seed, 8)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seeds[0],
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(min_scale, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    view = tf.image.resize(
        tf.cast(crop, tf.float32) / 255.0, (size, size), antialias=True
    )
    view = tf.clip_by_value(view, 0.0, 1.0)
    view = _apply_with_probability(
        0.8, seeds[1], lambda x: _color_jitter(x, seeds[2]), view
    )
    view = _apply_with_probability(0.2, seeds[3], _grayscale, view)
    # sigma is in pixels of a 224-px view, as in the released configs; scale it
    # with the view so a small preset blurs as much of the image.
    pixel_scale = size / 224.0
    sigma = tf.random.stateless_uniform([], seeds[4], 0.1, 2.0) * pixel_scale
    radius = max(1, math.ceil(3 * 2.0 * pixel_scale))
    view = _apply_with_probability(
        0.5, seeds[5], lambda x: _gaussian_blur(x, sigma, radius), view
    )
    view = tf.image.stateless_random_flip_left_right(view, seeds[6])
    return normalize(view)


def eval_view(image, size: int):
    """Resize the shorter side to `size * 256 / 224`, centre-crop `size`, normalise."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size * 256 / 224) / tf.reduce_min(shape)
    resized_shape = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    resized = tf.image.resize(
        tf.cast(image, tf.float32) / 255.0, resized_shape, antialias=True
    )
    top = (resized_shape[0] - size) // 2
    left = (resized_shape[1] - size) // 2
    crop = resized[top : top + size, left : left + size]
    crop.set_shape([size, size, 3])
    return normalize(tf.clip_by_value(crop, 0.0, 1.0))
