"""The names under which evaluation figures are logged; imports nothing, so
the configuration can check `--keep-best` before Keras loads."""

from __future__ import annotations

# The figures of an evaluation during training, as logged (progress line,
# TensorBoard, `--keep-best`): `<task>_<metric>` of the results of
# `declip_keras.evaluation.metrics.evaluate`, with "@" dropped (TensorBoard's
# names cannot hold it).
EVAL_METRICS = {
    "zero_shot": ("top1", "top5", "mean_per_class_recall"),
    "retrieval": tuple(
        f"{direction}_R@{k}"
        for direction in ("image_to_text", "text_to_image")
        for k in (1, 5, 10)
    ),
    "linear_probe": ("test_accuracy",),
}


def eval_metric_name(task: str, metric: str) -> str:
    """The logged name of one evaluation figure, e.g. `zero_shot_top1`."""
    return f"{task}_{metric}".replace("@", "")
