"""Training-step throughput of a preset on whatever device the backend sees.

    KERAS_BACKEND=jax python scripts/benchmark_step.py --preset vitb32 \
        --mode declip --precision bfloat16 --batch-size 256

Times full training steps (forward, every active loss, backward, AdamW) on a
fixed synthetic batch whose captions hold up to `--caption-tokens` tokens,
with MLM targets drawn as the input pipeline draws them, trimmed to their
bucket and packed as the pipeline does (`--no-bucketing`: the full context,
one row of target slots per caption); `--device-augmentation` adds the
photometric augmentation that the model then applies in its step. Prints
pairs/s and ms/step (median of `--repeats` timings), peak memory, the model
FLOPs per step counted analytically, and the model FLOP utilisation against
the device's peak (from the table below, or `--peak-tflops`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

# Dense peak TFLOP/s per chip (bf16 / fp32 where the vendor gives both).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L4": {"bfloat16": 121.0, "float32": 30.3},
    "A10": {"bfloat16": 125.0, "float32": 31.2},
    "T4": {"bfloat16": 65.0, "float32": 8.1},
    "V100": {"bfloat16": 125.0, "float32": 15.7},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
}


def transformer_flops(tokens: int, width: int, layers: int) -> float:
    """Forward FLOPs of `layers` pre-norm blocks over `tokens` tokens: the
    q/k/v/out projections (8 w^2 per token), the 4x MLP (16 w^2), and the
    attention scores and mixing (4 T w)."""
    return layers * tokens * (24 * width**2 + 4 * tokens * width)


def image_tower_flops(config: dict, model) -> float:
    """Forward FLOPs of one image through the image tower."""
    if config["image_encoder"] == "vit":
        grid = config["image_size"] // config["patch_size"]
        width = config["vision_width"]
        patches = 2 * grid**2 * 3 * config["patch_size"] ** 2 * width
        blocks = transformer_flops(grid**2 + 1, width, config["vision_layers"])
        return patches + blocks + 2 * width * config["embed_dim"]
    # ResNet: every convolution and dense layer, from its output shape.
    import keras

    from declip_keras.compat import nested_layers

    flops = 0.0
    for layer in nested_layers(model.image_encoder):
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width_out, channels = layer.output.shape
            kernel = np.prod(layer.kernel_size) * layer.kernel.shape[2]
            flops += 2 * kernel * channels * height * width_out
        elif isinstance(layer, keras.layers.Dense) and layer.built:
            flops += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return flops


def step_flops(
    config: dict, model, batch: int, caption_tokens: int, views: int
) -> float:
    """Model FLOPs of one training step (backward = 2 x forward) on `views`
    image views and as many captions per pair."""
    embed = config["embed_dim"]
    text = transformer_flops(
        caption_tokens, config["text_width"], config["text_layers"]
    )
    text += 2 * config["text_width"] * embed
    forward = views * batch * (image_tower_flops(config, model) + text)
    pairs = 4 if model.multi_view else 1
    forward += pairs * 2 * 2 * batch * batch * embed  # both directions
    if model.ss_weight:
        p, h = model.simsiam_projection_dim, model.simsiam_prediction_dim
        head = 2 * (embed * p + 2 * p * p + p * h + h * p)
        forward += 2 * batch * head
    if model.mlm_weight:
        masked = 0.15 * caption_tokens
        forward += 2 * batch * masked * config["text_width"] * config["vocabulary_size"]
    lookup = 0.0  # forward only: no gradient flows through the queue search
    if model.nn_weight:
        lookup = views * 2 * batch * model.queue_size * embed
        forward += views * views * 2 * 2 * batch * batch * embed
    return 3 * forward + lookup


def photometric_inputs(batch: dict, size: int) -> dict:
    """Crops in [0, 1] and drawn photometric parameters for each image view."""
    import tensorflow as tf

    from declip_keras.data.augment import photometric_params
    from declip_keras.data.batch_format import PHOTOMETRIC

    inputs = {}
    for view, key in PHOTOMETRIC.items():
        if view in batch:
            images = batch[view]
            seeds = [tf.constant([len(key), row]) for row in range(len(images))]
            rows = [photometric_params(seed, size).numpy() for seed in seeds]
            inputs[view] = (images - images.min()) / np.ptp(images)
            inputs[key] = np.stack(rows)
    return inputs


def as_the_pipeline_makes_them(
    batch: dict, vocabulary_size: int, context: int, mlm: bool
) -> dict:
    """The captions padded with the end token to the context, as the tokenizer
    pads them; with `mlm`, the first one masked and its targets drawn as the
    input pipeline draws them (15% of the ordinary tokens, `mask_tokens`)."""
    import tensorflow as tf

    from declip_keras.data.masking import mask_tokens

    special = [vocabulary_size - 3, vocabulary_size - 2, vocabulary_size - 1]
    captions = {}
    for key in ("token_ids", "eda_token_ids"):
        ids = np.pad(batch[key], ((0, 0), (0, context - batch[key].shape[1])))
        after_end = np.arange(context) > ids.argmax(axis=1)[:, None]
        captions[key] = np.where(after_end, special[-1], ids).astype(np.int32)
    if mlm:
        masked = mask_tokens(captions["eda_token_ids"], tf.constant([0, 0]), special)
        captions.update({key: np.asarray(value) for key, value in masked.items()})
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--mode", choices=["clip", "declip"], default="declip")
    parser.add_argument(
        "--precision", choices=["float32", "bfloat16", "float16"], default="float32"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="micro-batches per step, as train's")  # fmt: skip
    parser.add_argument("--caption-tokens", type=int, default=16,
                        help="tokens per caption, start and end included")  # fmt: skip
    parser.add_argument("--no-bucketing", action="store_true")
    parser.add_argument("--device-augmentation", action="store_true",
                        help="colour, blur and flip inside the step")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--profile", metavar="DIR",
                        help="then trace --steps steps per op into DIR")  # fmt: skip
    args = parser.parse_args()

    import keras

    from declip_keras.backend import accelerator, peak_memory_bytes, profiling
    from declip_keras.data.masking import pack_targets
    from declip_keras.data.pipeline import trim_captions
    from declip_keras.data.synthetic import synthetic_batch
    from declip_keras.models.declip import DeCLIP
    from declip_keras.models.presets import parse_overrides, preset_config
    from declip_keras.training.config import PRECISIONS, TrainConfig
    from declip_keras.training.optim import make_optimizer

    overrides = TrainConfig(
        data="-",
        output="-",
        method=args.mode,
        accum_steps=args.accum_steps,
        overrides=parse_overrides(args.set),
    ).model_overrides()
    config = preset_config(args.preset, **overrides)
    dtype = PRECISIONS[args.precision]
    if dtype:
        keras.mixed_precision.set_dtype_policy(dtype)
    model = DeCLIP.from_preset_config(config, dtype=dtype)
    model.compile(optimizer=make_optimizer(model, 1e-4))  # as `train` builds it

    context = config["context_length"]
    size = config["image_size"]
    if not 7 <= args.caption_tokens <= context:  # room for the MLM targets
        raise SystemExit(f"--caption-tokens must be 7..{context}")
    batch = synthetic_batch(args.batch_size, size, args.caption_tokens,
                            config["vocabulary_size"], seed=0)  # fmt: skip
    mlm = args.mode == "declip" and model.mlm_weight > 0
    batch.update(
        as_the_pipeline_makes_them(batch, config["vocabulary_size"], context, mlm)
    )
    if not args.no_bucketing:
        batch = trim_captions(batch, context)
        if mlm:
            batch.update(pack_targets(batch))
        batch = {k: np.asarray(v) for k, v in batch.items()}
    if args.mode == "clip":
        batch = {k: batch[k] for k in ("image_1", "token_ids")}
    if args.device_augmentation:
        batch.update(photometric_inputs(batch, size))
    length = batch["token_ids"].shape[1]

    def run(steps: int) -> float:
        began = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(batch)  # returns host floats: a sync per step
        return time.perf_counter() - began

    run(3)  # compilation and warm-up
    seconds = statistics.median(
        run(args.steps) / args.steps for _ in range(args.repeats)
    )
    kind, name = accelerator()
    views = 2 if "image_2" in batch else 1
    flops = step_flops(config, model, args.batch_size, length, views)
    peak = args.peak_tflops
    if peak is None:
        known = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
        # The table's 16-bit figures serve float16 and bfloat16 alike.
        column = "float32" if args.precision == "float32" else "bfloat16"
        peak = PEAK_TFLOPS[known[0]][column] if known else None
    result = {
        "backend": keras.backend.backend(),
        "device": f"{kind}: {name}",
        "preset": args.preset,
        "mode": args.mode,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "accum_steps": args.accum_steps,
        "caption_tokens": args.caption_tokens,
        "text_length": length,
        "device_augmentation": args.device_augmentation,
        "pairs_per_second": round(args.batch_size / seconds, 1),
        "ms_per_step": round(1000 * seconds, 1),
        "peak_memory_gib": round(peak_memory_bytes() / 2**30, 2),
        "model_tflops_per_step": round(flops / 1e12, 4),
        "achieved_tflops": round(flops / seconds / 1e12, 3),
        "mfu": round(flops / seconds / 1e12 / peak, 4) if peak else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    if args.profile:
        with profiling(args.profile) as table:
            run(args.steps)
        print(f"per-op trace of {args.steps} steps: {args.profile}")
        if table() is not None:
            print(table())


if __name__ == "__main__":
    main()
