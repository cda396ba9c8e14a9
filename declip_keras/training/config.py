"""`TrainConfig`: everything that defines a pretraining run.

Each field carries its command-line help (and OpenCLIP's name for it where the
meaning is the same), so `declip-keras train` builds its options from this
class. The module imports nothing heavy: the command line reads it before
Keras loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from declip_keras.data.image_constants import AUGMENTATIONS, default_augmentation
from declip_keras.evaluation.metric_names import EVAL_METRICS, eval_metric_name
from declip_keras.evaluation.sources import EVAL_TARGETS, EvaluationTargets
from declip_keras.models.loss_terms import LOSS_TERMS
from declip_keras.models.presets import PRESETS

METHODS = ("declip", "clip")
# Each --precision and the Keras dtype policy it trains under.
PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
DEFAULT_CHECKPOINT_EVERY = 200
# What a resumed run may change: how long it runs, how it recovers and waits,
# how many checkpoints it keeps and what it evaluates. Every other field
# shapes the model, the data order or the schedule the checkpoints hold.
MAY_CHANGE_ON_RESUME = (
    "steps", "epochs", "stall_timeout", "on_divergence", "max_rollbacks",
    "keep_checkpoints", "zero_shot", "classnames", "templates", "retrieval",
    "probe", "eval_every", "keep_best",
)  # fmt: skip
# Fields holding paths: the record and the command may spell one differently.
_PATHS = ("data", "output", "vocabulary", "init_from", "resume_from")


def _field(default: Any, description: str, **cli: Any) -> Any:
    """A dataclass field whose metadata holds its command-line option: the
    `description` (its help), and optionally `aliases`, `choices`, `nargs`
    and `metavar`, or `cli=False` for a field the command line sets another
    way. `dataclasses.MISSING`: required."""
    metadata = {"help": description, **cli}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; written to `OUTPUT/config.json`.

    Example:
    >>> config = TrainConfig(data="shards/*.tfrecord", output="runs/a", method="clip")
    >>> config.augmentation, config.model_overrides()["ss_weight"]
    ('crop', 0.0)
    """

    data: str = _field(
        dataclasses.MISSING, "TFRecord shard glob", aliases=["--train-data"]
    )
    output: str = _field(
        dataclasses.MISSING, "run folder (checkpoints, logs, model.keras)"
    )
    preset: str = _field(
        "tiny", "model architecture (random weights)", choices=sorted(PRESETS)
    )
    overrides: dict[str, Any] = _field(
        {}, "preset fields changed by --set and the loss weights", cli=False
    )
    batch_size: int = _field(64, "global batch size")
    accum_steps: int = _field(
        1,
        "gradient accumulation: each device runs its share of the batch "
        "through the towers in this many micro-batches, one at a time, and "
        "recomputes each one's activations in the backward pass (what "
        "OpenCLIP's --accum-freq computes: every loss term still sees the "
        "whole batch, for one more forward pass of the towers and the "
        "towers' activation memory of one micro-batch); ViT towers only. "
        "--batch-size stays the batch of one optimizer step: OpenCLIP's "
        "--batch-size B --accum-freq K on N GPUs is --batch-size B*K*N "
        "--accum-steps K",
    )
    steps: int | None = _field(None, "optimizer steps (default: from --epochs)")
    epochs: float = _field(1.0, "passes over the data, when --steps is not given")
    learning_rate: float = _field(1e-3, "peak learning rate", aliases=["--lr"])
    warmup_steps: int | None = _field(
        None,
        "linear warm-up steps (default: 2,500/128,000 of the steps, as DeCLIP)",
        aliases=["--warmup"],
    )
    weight_decay: float = _field(0.1, "AdamW weight decay", aliases=["--wd"])
    # AdamW's moments: the released DeCLIP configs' (and CLIP's) values.
    beta1: float = _field(0.9, "AdamW's first-moment decay")
    beta2: float = _field(0.98, "AdamW's second-moment decay")
    eps: float = _field(1e-8, "AdamW's epsilon")
    method: str = _field(
        "declip",
        "declip: all five losses; clip: the plain CLIP baseline (one image "
        "view, one caption, the contrastive loss alone)",
        choices=METHODS,
    )
    augmentation: str | None = _field(
        None,
        "image views: mocov2 (crop 0.2-1, colour jitter, grayscale, blur, flip), "
        "mocov2-noflip (the same, never mirrored: digits, text) or crop (crop "
        "0.5-1 only); default: mocov2 for declip, crop for clip, as in the "
        "released code",
        choices=AUGMENTATIONS,
    )
    device_augmentation: bool = _field(
        False,
        "apply the colour jitter, grayscale, blur and flip inside the model's "
        "step on the accelerator; the input pipeline then only decodes, crops "
        "and resizes (same views, less host CPU per pair)",
    )
    init_from: str | None = _field(
        None,
        "start from a pretrained checkpoint (OpenAI/OpenCLIP ViT .pt, .bin, "
        ".safetensors; a released DeCLIP ViT checkpoint; a keras-hub CLIP "
        "preset folder): its architecture replaces the preset's, its weights "
        "the random ones (a run of this package continues with --resume PATH)",
        metavar="CHECKPOINT",
    )
    lock_image: bool = _field(
        False, "keep the image tower as it starts (OpenCLIP's --lock-image)"
    )
    lock_text: bool = _field(
        False, "keep the text tower as it starts (OpenCLIP's --lock-text)"
    )
    vocabulary: str | None = _field(
        None, "tokenizer folder from train-tokenizer (default: CLIP's BPE)"
    )
    precision: str = _field(
        "float32",
        "bfloat16: mixed precision; float16: mixed precision with dynamic loss "
        "scaling, for GPUs without bfloat16 (losses stay float32 either way)",
        choices=tuple(PRECISIONS),
    )
    checkpoint_every: int | None = _field(
        None,
        "steps between checkpoints (default: --eval-every when given, as "
        "evaluations run at checkpoints; else 200)",
    )
    keep_checkpoints: int = _field(3, "newest checkpoints kept")
    on_divergence: str = _field(
        "stop",
        "on a NaN or a loss jump: stop, or reload the last good checkpoint and "
        "halve the learning rate",
        choices=("stop", "rollback"),
    )
    max_rollbacks: int = _field(
        3, "rollbacks before the run gives up (with --on-divergence rollback)"
    )
    stall_timeout: float = _field(
        1800.0,
        "with several processes: seconds after the first step without a finished "
        "step (or checkpoint, or evaluation) after which a process exits with "
        "status 1, as one of the job has probably failed; 0: wait forever",
    )
    resume_from: str | None = _field(
        None,
        "a checkpoint or run folder to start from when OUTPUT has no checkpoint",
        cli=False,
    )
    seed: int = _field(0, "seed of the data order, augmentations and weights")
    # Evaluation targets; `declip-keras eval` takes the same options.
    zero_shot: str | None = _field(
        None,
        "zero-shot classification: ImageFolder directory or labelled shards "
        "(int64 `label`)",
    )
    classnames: str | None = _field(
        None,
        "a dataset (imagenet1k, cifar10, cifar100, food101, pets, flowers, "
        "caltech101, sun397, cars, dtd, aircraft), comma-separated names or a "
        "JSON file holding a list; ImageFolder default: its folder names",
    )
    templates: str | None = _field(
        None,
        "simple, a dataset's CLIP templates (imagenet1k: CLIP's 80), or "
        "'a photo of a {}.|a {}' (default: --classnames' dataset's, else simple)",
    )
    retrieval: str | None = _field(
        None, "Karpathy JSON (COCO/Flickr30k) or caption shards (shared key = image)"
    )
    probe: list[str] | None = _field(
        None,
        "linear probe: ImageFolder directories or labelled shards",
        nargs=2,
        metavar=("TRAIN", "TEST"),
    )
    eval_every: int | None = _field(
        None,
        "steps between evaluations during training; alone it sets the "
        "checkpoint period, with --checkpoint-every it must be a multiple of "
        "it (default: at every checkpoint when --zero-shot, --retrieval or "
        "--probe is given); the last step is always evaluated",
    )
    keep_best: str | None = _field(
        None,
        "keep the checkpoint with the highest figure of this name as "
        "checkpoints/best.keras, e.g. zero_shot_top1",
        metavar="METRIC",
    )

    def __post_init__(self):
        if self.checkpoint_every is None:
            # A non-positive --eval-every is refused below under its own name.
            given = self.eval_every is not None and self.eval_every > 0
            self.checkpoint_every = (
                self.eval_every if given else DEFAULT_CHECKPOINT_EVERY
            )
        positive = {
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "eps": self.eps,
        }
        if self.steps is not None:
            positive["steps"] = self.steps
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        for name in ("warmup_steps", "max_rollbacks", "weight_decay", "stall_timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be at least 0 and below 1, got {value}.")
        if "accum_steps" in self.overrides:
            raise ValueError("Set accum_steps with --accum-steps, not --set.")
        self._check_evaluation()
        if self.augmentation is None:
            self.augmentation = default_augmentation(self.declip)
        choices = {
            field.name: field.metadata["choices"]
            for field in dataclasses.fields(self)
            if "choices" in field.metadata
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {tuple(allowed)}, got "
                    f"{getattr(self, name)!r}."
                )

    def _check_evaluation(self) -> None:
        tasks = self.eval_tasks  # builds the targets: checks `probe`
        if self.eval_every is not None:
            if not tasks:
                raise ValueError("eval_every needs zero_shot, retrieval or probe.")
            if self.eval_every <= 0 or self.eval_every % self.checkpoint_every:
                raise ValueError(
                    f"eval_every ({self.eval_every}) must be a positive multiple "
                    f"of checkpoint_every ({self.checkpoint_every}): evaluations "
                    "run at checkpoints."
                )
        if self.keep_best is not None and self.keep_best not in self.eval_figures:
            raise ValueError(
                f"keep_best must name a figure of the evaluations asked for, one "
                f"of {list(self.eval_figures)}; got {self.keep_best!r}."
            )

    @property
    def eval_targets(self) -> EvaluationTargets:
        """The evaluations to run during training, and their data."""
        return EvaluationTargets(**{name: getattr(self, name) for name in EVAL_TARGETS})

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        """The evaluations to run during training (`evaluation.evaluate`'s keys)."""
        return tuple(self.eval_targets.sources)

    @property
    def eval_figures(self) -> tuple[str, ...]:
        """The names of the figures those evaluations log."""
        return tuple(
            eval_metric_name(task, metric)
            for task in self.eval_tasks
            for metric in EVAL_METRICS[task]
        )

    @property
    def declip(self) -> bool:
        """Whether the run trains DeCLIP (else the plain CLIP baseline)."""
        return self.method == "declip"

    def model_overrides(self) -> dict[str, Any]:
        """The preset overrides of the model this run builds: the run's seed,
        `overrides`, and for the CLIP baseline the contrastive loss alone."""
        overrides = {
            "seed": self.seed,
            "accum_steps": self.accum_steps,
            **self.overrides,
        }
        if not self.declip:
            overrides.update({t.weight: t.clip_baseline for t in LOSS_TERMS})
        return overrides


def _same(name: str, a: Any, b: Any) -> bool:
    if name in _PATHS and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    # The record is JSON: tuples read back as lists.
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def resumed_config(
    recorded: dict[str, Any], given: dict[str, Any], where: str = "config.json"
) -> TrainConfig:
    """The configuration a resumed run continues with: the run's record
    (`recorded`, its `config.json`) with the fields `given` on the command
    line. A given field that differs from the record is refused unless it is
    in `MAY_CHANGE_ON_RESUME`; a model field in `given["overrides"]` (`--set`,
    the loss weights) is compared with the model the record describes.

    Example:
    >>> record = {"data": "d", "output": "o", "batch_size": 32, "epochs": 3}
    >>> resumed_config(record, {"steps": 10}).batch_size
    32
    >>> resumed_config(record, {"batch_size": 64})
    Traceback (most recent call last):
    ValueError: --resume: batch_size is 32 in config.json, 64 here; a resumed run keeps its settings (it may change steps, epochs, stall_timeout, on_divergence, max_rollbacks, keep_checkpoints, zero_shot, classnames, templates, retrieval, probe, eval_every, keep_best).
    """  # noqa: E501
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in recorded.items() if name in names}
    model = recorded.get("model", {})
    for name, value in given.items():
        if name == "overrides":
            for key, wanted in value.items():
                held = model.get(key, values.get("overrides", {}).get(key))
                if not _same(key, held, wanted):
                    raise ValueError(
                        f"--resume: the model's {key} is {held!r} in {where}, "
                        f"{wanted!r} here; a resumed run keeps its model."
                    )
            continue
        held = values.get(name)
        if name not in MAY_CHANGE_ON_RESUME and not _same(name, held, value):
            raise ValueError(
                f"--resume: {name} is {held!r} in {where}, {value!r} "
                "here; a resumed run keeps its settings (it may change "
                f"{', '.join(MAY_CHANGE_ON_RESUME)})."
            )
        values[name] = value
    if "epochs" in given and "steps" not in given:
        values["steps"] = None  # the record's steps would outrank the epochs
    return TrainConfig(**values)
