"""Pretraining runs: build or resume the model, fit, recover from divergence.

A run is a sequence of Keras "epochs" of `checkpoint_every` steps each, so a
checkpoint ends every epoch and `fit(initial_epoch=...)` resumes at the exact
step. Checkpoints are `.keras` files (model, temperature, neighbour queue and
optimizer state) written under a temporary name and renamed, so a run killed
at any moment leaves only whole checkpoints (`declip_keras.training.runs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import keras
import numpy as np

from declip_keras.backend import (
    Replicas,
    can_remat_blocks,
    configure_distribution,
    share_across_processes,
    whole_state,
)
from declip_keras.compat import CountingLossScaleOptimizer
from declip_keras.data.checks import SkipCounter
from declip_keras.data.pipeline import PipelineOptions, host_shards, training_dataset
from declip_keras.data.records import list_shards, scan_shard
from declip_keras.data.tokenizer import (
    CaptionTokenizer,
    check_vocabulary,
    clip_tokenizer,
    load_tokenizer,
)
from declip_keras.evaluation.metrics import check_targets, target_arguments
from declip_keras.interop.pretrained import Pretrained, read_pretrained
from declip_keras.models.declip import DeCLIP
from declip_keras.models.presets import preset_config
from declip_keras.training.callbacks import (
    Checkpointer,
    DivergenceGuard,
    Evaluator,
    StallWatchdog,
    TrainingMonitor,
)
from declip_keras.training.config import PRECISIONS, TrainConfig
from declip_keras.training.files import (
    remove_partial_files,
    save_atomically,
    write_json,
)
from declip_keras.training.optim import (
    WarmupCosine,
    default_warmup_steps,
    make_optimizer,
)
from declip_keras.training.runs import (
    DamagedFileError,
    all_finite,
    checkpoints,
    completed_steps,
    hold_run,
    load_file,
    remove_run,
)


class TrainingError(RuntimeError):
    """A run that cannot go on or cannot succeed: the message says why."""


def _evaluation_targets(config: TrainConfig) -> dict[str, Any]:
    """`evaluate`'s arguments for the run's evaluations ({} for none); their
    sources and class names are checked now rather than at the first
    evaluation."""
    targets = config.eval_targets
    if not targets.sources:
        return {}
    check_targets(targets)
    return target_arguments(targets)


def count_pairs(pattern: str) -> int:
    """Records in the shards (read from their framing, no decoding)."""
    return sum(scan_shard(f).records for f in list_shards(pattern))


def _build(
    config: TrainConfig,
    model_config: dict,
    total_steps: int,
    scale: float,
    pretrained: Pretrained | None,
) -> DeCLIP:
    model = DeCLIP.from_preset_config(model_config, dtype=PRECISIONS[config.precision])
    if pretrained is not None:
        pretrained.load(model)
    _compile(model, config, total_steps, scale)
    return model


def _compile(
    model: DeCLIP, config: TrainConfig, total_steps: int, scale: float
) -> None:
    # Never set back to True: that would also unfreeze the patch embedding.
    if config.lock_image:
        model.image_encoder.trainable = False
    if config.lock_text:
        model.text_encoder.trainable = False
    warmup = config.warmup_steps
    if warmup is None:
        warmup = default_warmup_steps(total_steps)
    schedule = WarmupCosine(config.learning_rate, warmup, total_steps, scale=scale)
    optimizer = make_optimizer(
        model,
        schedule,
        weight_decay=config.weight_decay,
        beta1=config.beta1,
        beta2=config.beta2,
        eps=config.eps,
    )
    if config.precision == "float16":
        optimizer = CountingLossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)


def _restore(path: Path, config: TrainConfig, total_steps: int, scale: float) -> DeCLIP:
    """The checkpoint's model with a rebuilt optimizer holding its state.

    The optimizer is rebuilt rather than deserialised because Keras does not
    save AdamW's weight-decay exclusions.
    """
    model = load_file(path, compile=False)
    model.accum_steps = config.accum_steps
    _compile(model, config, total_steps, scale)
    model.load_weights(path)
    return model


def _restore_newest(
    output: Path, config: TrainConfig, total_steps: int, scale: float
) -> DeCLIP | None:
    """The newest checkpoint that loads and holds finite weights, or None.

    Looks in `output`, then at `config.resume_from` (a checkpoint or a run
    folder's newest). A damaged or non-finite one is named on stderr and
    skipped.
    """
    candidates = list(reversed(checkpoints(output)))
    if config.resume_from:
        start = Path(config.resume_from)
        found = list(reversed(checkpoints(start))) if start.is_dir() else [start]
        if not found or not found[0].is_file():
            raise FileNotFoundError(f"No checkpoint at {start}.")
        candidates += found
    for path in candidates:
        try:
            model = _restore(path, config, total_steps, scale)
        except DamagedFileError as error:
            print(f"{error} Using an older checkpoint.", file=sys.stderr)
            continue
        with whole_state(model):  # the queues split over hosts, gathered
            finite = all_finite(model)
        if finite:
            print(f"Continuing from {path}.")
            return model
        print(f"{path} holds non-finite weights; skipping it.", file=sys.stderr)
    return None


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided and checked before it writes or builds.

    Attributes:
        config: the run's configuration, the text tower sized to its
            vocabulary.
        pairs: records in the training shards.
        steps: optimizer steps in all, whole checkpoint periods.
        every: steps per checkpoint period (a Keras "epoch").
        replicas: how the run is spread over devices and hosts.
        shards_read: how many of the shards this host reads.
        model_config: the resolved preset of the model it builds.
        tokenizer: the run's own vocabulary's tokenizer, or None for CLIP's.
        targets: `evaluate`'s arguments for evaluation while training ({}:
            none).
        pretrained: the weights it starts from (`init_from`), or None.
    """

    config: TrainConfig
    pairs: int
    steps: int
    every: int
    replicas: Replicas
    shards_read: int
    model_config: dict[str, Any]
    tokenizer: CaptionTokenizer | None
    targets: dict[str, Any]
    pretrained: Pretrained | None

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    def effective_config(self) -> dict[str, Any]:
        """`config.json`: the configuration as the run applies it."""
        return {
            **dataclasses.asdict(self.config),
            # Absolute: evaluation and export read it from any directory.
            "vocabulary": self.config.vocabulary
            and str(Path(self.config.vocabulary).resolve()),
            "total_steps": self.steps,
            "pairs": self.pairs,
            "model": self.model_config,
            "backend": keras.backend.backend(),
            "devices": self.replicas.devices,
            "hosts": self.replicas.host_count,
        }

    def distribution_line(self) -> str:
        """How the run is spread, as every process prints it at start."""
        replicas, batch = self.replicas, self.config.batch_size
        return (
            f"{replicas.engine}: {replicas.host_count} process(es), "
            f"{replicas.devices} device(s); global batch {batch}, "
            f"{batch // replicas.devices} per device; process "
            f"{replicas.host_index} reads {self.shards_read} of "
            f"{len(list_shards(self.config.data))} shards."
        )

    def pipeline_options(self, start_step: int, mlm: bool) -> PipelineOptions:
        """The training batches of a fit from `start_step`, for this host."""
        config, replicas = self.config, self.replicas
        return PipelineOptions(
            batch_size=config.batch_size // replicas.host_count,
            image_size=self.model_config["image_size"],
            context_length=self.model_config["context_length"],
            seed=config.seed,
            declip=config.declip,
            mlm=config.declip and mlm,
            augmentation=config.augmentation,
            device_augmentation=config.device_augmentation,
            start_step=start_step,
            host_index=replicas.host_index,
            host_count=replicas.host_count,
            replica_splits=replicas.batch_splits,
        )


def plan_run(config: TrainConfig) -> RunPlan:
    """Every check a run can make before it writes a file or builds a model.

    Sets the global seed and dtype policy (the pretrained reader builds
    keras-hub models under them).

    Raises:
        TrainingError: the data hold fewer records than one batch.
        FileNotFoundError: `resume_from` or `init_from` does not exist.
        ValueError: the batch does not split over the devices and
            micro-batches, remat is unavailable on this backend, or
            `vocabulary_size` contradicts the vocabulary.
    """
    if config.vocabulary:  # a mistyped folder before the data's scan
        check_vocabulary(config.vocabulary)
    pairs = count_pairs(config.data)
    if pairs < config.batch_size:
        raise TrainingError(
            f"{config.data} holds {pairs} records, fewer than one batch of "
            f"{config.batch_size}; look at it with `declip-keras check-data`."
        )
    if config.resume_from and not Path(config.resume_from).exists():
        raise FileNotFoundError(f"No checkpoint at {config.resume_from}.")
    if config.init_from and not Path(config.init_from).exists():
        raise FileNotFoundError(f"--init-from: no checkpoint at {config.init_from}.")
    replicas = configure_distribution()
    # Too few shards for the hosts is refused here, before any work.
    shards = host_shards(config.data, replicas.host_index, replicas.host_count)
    if config.batch_size % (replicas.devices * config.accum_steps):
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {replicas.devices} "
            f"device(s) x {config.accum_steps} micro-batch(es); choose a multiple."
        )
    if config.eval_targets.sources and not replicas.writer_computes_alone:
        raise ValueError(
            "Evaluation during training is not available with several JAX "
            "processes yet (the first process cannot run the model alone); "
            "train without the evaluation options and run `declip-keras eval` "
            "on model.keras."
        )
    keras.utils.set_random_seed(config.seed)
    if PRECISIONS[config.precision]:
        keras.mixed_precision.set_dtype_policy(PRECISIONS[config.precision])
    pretrained = read_pretrained(config.init_from) if config.init_from else None
    architecture = pretrained.architecture if pretrained else {}
    model_config = preset_config(
        config.preset, **{**architecture, **config.model_overrides()}
    )
    # Not the user's choice: one queue per replica, laid out as the backend
    # spreads the step.
    model_config["queue_replicas"] = replicas.queue_replicas
    if model_config["remat"] and not can_remat_blocks():
        raise ValueError(
            f"remat is not available on {keras.backend.backend()}: Keras' "
            "TensorFlow remat cannot wrap keras-hub's blocks; use jax or torch."
        )
    tokenizer = None
    if config.vocabulary:
        tokenizer = load_tokenizer(model_config["context_length"], config.vocabulary)
        size = config.overrides.get("vocabulary_size", tokenizer.vocabulary_size)
        if size != tokenizer.vocabulary_size:
            raise ValueError(
                f"vocabulary_size={size} but {config.vocabulary} holds "
                f"{tokenizer.vocabulary_size} tokens."
            )
        # The text tower is sized to the tokenizer.
        model_config["vocabulary_size"] = size
        config = dataclasses.replace(
            config, overrides={**config.overrides, "vocabulary_size": size}
        )
    targets = _evaluation_targets(config)
    steps = config.steps or max(1, math.ceil(config.epochs * pairs / config.batch_size))
    every = min(config.checkpoint_every, steps)
    return RunPlan(
        config=config,
        pairs=pairs,
        steps=math.ceil(steps / every) * every,
        every=every,
        replicas=replicas,
        shards_read=len(shards),
        model_config=model_config,
        tokenizer=tokenizer,
        targets=targets,
        pretrained=pretrained,
    )


def _start_model(plan: RunPlan) -> DeCLIP:
    """The newest usable checkpoint's model, else a new one."""
    config, replicas = plan.config, plan.replicas
    with replicas.scope():
        model = _restore_newest(plan.output, config, plan.steps, 1.0)
        if model is None:
            model = _build(config, plan.model_config, plan.steps, 1.0, plan.pretrained)
    if model.queue_replicas != replicas.queue_replicas:
        raise ValueError(
            f"The checkpoint resumed holds neighbour queues for "
            f"{model.queue_replicas} devices and this run has "
            f"{replicas.queue_replicas}; resume on as many JAX devices."
        )
    share_across_processes(model)
    return model


def _fit_with_rollback(
    plan: RunPlan,
    model: DeCLIP,
    counter: SkipCounter,
    verbose: int | str,
    callbacks: Sequence[keras.callbacks.Callback],
) -> tuple[DeCLIP, dict[str, list], int]:
    """Fits to the last step, rolling back past divergences as configured;
    returns the model, the history and the rollbacks taken."""
    config, replicas, output, every = (
        plan.config,
        plan.replicas,
        plan.output,
        plan.every,
    )
    writes = replicas.writes_files
    if plan.targets:
        # Built once: keras-hub's BPE takes seconds to set up.
        eval_tokenizer = plan.tokenizer or clip_tokenizer(
            plan.model_config["context_length"]
        )
    scale, rollbacks, history = 1.0, 0, {}
    while True:
        step = completed_steps(model)
        if step >= plan.steps:
            break
        dataset = training_dataset(
            config.data,
            plan.pipeline_options(step, mlm=model.mlm_weight > 0),
            tokenizer=plan.tokenizer,
            counter=counter,
        )
        guard = DivergenceGuard()
        evaluator = []
        if plan.targets and writes:
            # After the checkpoint it evaluates, before TensorBoard logs it.
            evaluator.append(
                Evaluator(
                    output,
                    config.eval_every or every,
                    plan.steps,
                    plan.targets,
                    eval_tokenizer,
                    guard,
                    config.keep_best,
                )  # fmt: skip
            )
        watchdog = []
        if plan.replicas.host_count > 1 and config.stall_timeout:
            watchdog.append(StallWatchdog(config.stall_timeout))
        logger = [
            keras.callbacks.TensorBoard(
                str(output / "logs"), update_freq=max(1, every // 10)
            )
        ][: int(writes)]
        result = model.fit(
            dataset,
            epochs=plan.steps // every,
            steps_per_epoch=every,
            initial_epoch=step // every,
            shuffle=False,  # the pipeline shuffles; Keras warns it would ignore it
            callbacks=[
                guard,
                Checkpointer(output, config.keep_checkpoints, guard, writes),
                *evaluator,
                TrainingMonitor(config.batch_size, counter),
                *logger,
                *callbacks,
                *watchdog,
            ],
            verbose=verbose if writes else 0,
        )
        for name, values in result.history.items():
            history.setdefault(name, []).extend(values)
        if not guard.diverged:
            if completed_steps(model) < plan.steps:
                usable = counter.counts()["usable"]
                raise TrainingError(
                    f"{config.data} ran out after step {completed_steps(model)}: "
                    f"{usable} usable pairs were read, fewer than one batch of "
                    f"{config.batch_size}; see `declip-keras check-data`."
                )
            return model, history, rollbacks
        good = checkpoints(output)
        where = f"The last good checkpoint is {good[-1]}" if good else "No checkpoint"
        if config.on_divergence == "stop" or not good:
            raise TrainingError(
                f"Training diverged at step {guard.step}: {guard.diverged}. {where}; "
                "resume with a lower --learning-rate, or pass --on-divergence "
                "rollback."
            )
        if rollbacks >= config.max_rollbacks:
            raise TrainingError(
                f"Training diverged at step {guard.step} ({guard.diverged}) after "
                f"{rollbacks} rollbacks at ever lower learning rates. {where}; "
                "check the data and the learning rate."
            )
        scale *= 0.5
        rollbacks += 1
        print(
            f"Diverged at step {guard.step} ({guard.diverged}); rollback "
            f"{rollbacks} of at most {config.max_rollbacks}: learning rate x{scale}."
        )
        with replicas.scope():
            model = _restore_newest(output, config, plan.steps, scale)
        if model is None:
            raise TrainingError(f"No readable, finite checkpoint in {output}.")
        share_across_processes(model)
    return model, history, rollbacks


def _write_summary(
    plan: RunPlan,
    model: DeCLIP,
    start: int,
    counter: SkipCounter,
    history: dict[str, list],
    rollbacks: int,
) -> dict[str, Any]:
    """`model.keras` and `summary.json` of a finished run; returns the summary."""
    output, writes = plan.output, plan.replicas.writes_files
    final = output / "model.keras"
    with whole_state(model):
        if not all_finite(model):
            raise TrainingError(
                "The weights are not finite at the end of training; model.keras "
                "was not written."
            )
        if writes:
            save_atomically(model, final)
    counts = counter.counts()
    if counts.get("unreadable"):
        print(
            f"{counts['unreadable']} record(s) of {plan.config.data} were never "
            "read: a damaged record hides the rest of its shard; `declip-keras "
            "check-data` names the shards.",
            file=sys.stderr,
        )
    trained = completed_steps(model) - start
    summary = {
        "steps": completed_steps(model),
        "steps_this_invocation": trained,
        "model": str(final),
        "rollbacks": rollbacks,
        # Named so they cannot be misread: records are checked ahead of use
        # (shuffle buffers), so checked - trained is not a count of bad data.
        # Both count the first pass over the shards only, as the skips do.
        "data": {
            "pairs_trained": trained * plan.config.batch_size,
            "records_checked": counts.pop("read"),
            "records_decoded": counts.pop("usable"),
            "skipped": counts,
        },
        "final_loss": float(np.asarray(history["loss"][-1]))
        if history.get("loss")
        else None,
        "history": history,
    }
    if plan.targets and writes:
        lines = (output / "metrics.jsonl").read_text().splitlines()
        summary["evaluation"] = json.loads(lines[-1])
        best = output / "checkpoints" / "best.json"
        if plan.config.keep_best and best.is_file():
            summary["best"] = json.loads(best.read_text())
    if writes:
        write_json(output / "summary.json", summary)
    return summary


def train(
    config: TrainConfig,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) a pretraining run; returns (and writes) a summary.

    In four stages: plan and check the run (`plan_run`), build the model or
    restore the newest usable checkpoint, fit with rollback past
    divergences, write the model and the summary. `callbacks` are added to
    the run's own (divergence guard, checkpoints, evaluation, monitoring,
    TensorBoard), after them. `overwrite` removes an earlier run's files
    from the output folder first, once its lock is held (never under a
    run that is still training there).

    Writes `config.json` (the effective configuration), `checkpoints/`,
    `logs/` (TensorBoard), `model.keras` and `summary.json`, every file under
    a temporary name first.

    Raises:
        TrainingError: the data hold no usable batch, the run diverged (and
            `on_divergence="stop"`, or `max_rollbacks` rollbacks did not
            help), or the weights are not finite at the end.
    """
    plan = plan_run(config)
    with hold_run(plan.output) if plan.replicas.writes_files else nullcontext():
        if overwrite and plan.replicas.writes_files:
            print(f"--overwrite: removing the earlier run in {plan.output}.")
            remove_run(plan.output)
        return _train_planned(plan, verbose, callbacks)


def _train_planned(
    plan: RunPlan, verbose: int | str, callbacks: Sequence[keras.callbacks.Callback]
) -> dict[str, Any]:
    output = plan.output
    if plan.replicas.writes_files:
        remove_partial_files(output, output / "checkpoints")
        effective = plan.effective_config()
        write_json(output / "config.json", effective)
        print(json.dumps(effective, indent=2, default=list))

    model = _start_model(plan)
    start = completed_steps(model)
    if start >= plan.steps and (output / "summary.json").is_file():
        print(f"{output} finished all {plan.steps} steps already; nothing to train.")
        return json.loads((output / "summary.json").read_text())
    print(plan.distribution_line(), flush=True)
    print(
        f"Training steps {start + 1}-{plan.steps} in periods of {plan.every} steps, "
        "each ending with a checkpoint (the progress bar calls a period an epoch)."
    )
    counter = SkipCounter()
    model, history, rollbacks = _fit_with_rollback(
        plan, model, counter, verbose, callbacks
    )
    return _write_summary(plan, model, start, counter, history, rollbacks)
