"""The DeCLIP model: two towers, the self-supervision heads and the loss logic."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# Registers the learning-rate schedule and the optimizers that a trained
# model's saved optimizer names, so loading a DeCLIP file needs this module
# alone.
import declip_keras.training.optim  # noqa: F401
from declip_keras.backend import (
    gather_replicas,
    global_value,
    map_in_turn,
    replica_offset,
    scale_loss_for_replicas,
)
from declip_keras.compat import FitsAcrossWorkers, nested_layers
from declip_keras.data import batch_format
from declip_keras.models import losses
from declip_keras.models.encoders import build_image_encoder, build_text_encoder
from declip_keras.models.initializers import torch_bias, torch_kernel
from declip_keras.models.layers import (
    PACKAGE,
    ClipValue,
    FeatureQueue,
    PhotometricAugmentation,
)
from declip_keras.models.loss_terms import LOSS_TERMS, LossTerm
from declip_keras.models.presets import MODEL_DEFAULTS, preset_config

# Text normalisation in the released DeCLIP code adds this to the norm.
TEXT_NORM_EPSILON = 1e-10


def _dense_bn(units: int, relu: bool, dtype, name: str) -> list[keras.layers.Layer]:
    # Batch norm follows, so the dense bias would be redundant.
    block = [
        keras.layers.Dense(
            units,
            use_bias=False,
            kernel_initializer=torch_kernel(),
            dtype=dtype,
            name=f"{name}_dense",
        ),
        keras.layers.BatchNormalization(
            momentum=0.9, epsilon=1e-5, dtype=dtype, name=f"{name}_bn"
        ),
    ]
    if relu:
        block.append(keras.layers.ReLU(dtype=dtype, name=f"{name}_relu"))
    return block


def _present(inputs: dict, keys: tuple[str, ...]) -> list:
    """The views among `keys` that the batch holds, in order."""
    return [inputs[key] for key in keys if key in inputs]


def _split_views(stacked, num_views: int) -> list:
    """`[V * B, ...]` (views concatenated on the batch axis) -> V tensors."""
    return ops.split(stacked, num_views, axis=0)


def _in_micro_batches(tower: keras.layers.Layer, inputs, steps: int, training):
    """`tower(inputs)` run over `steps` equal micro-batches, one at a time.

    Each micro-batch runs under `keras.remat`, so only its outputs are kept:
    the backward pass recomputes one micro-batch's activations at a time,
    against the other micro-batches' kept outputs. This is what OpenCLIP's
    `--accum-freq` computes (embeddings cached without gradient, then each
    micro-batch's forward again with gradient), done as one backward pass, so
    the logit scale's gradient is counted once and the loss is the whole
    batch's. `map_in_turn` rather than a Python loop makes the micro-batches
    run in turn: XLA otherwise schedules all the recomputations together,
    which saved 8% of the memory instead of 79% (JAX, 4 micro-batches).
    Micro-batch `k` takes rows `k, k + steps, ...`, so a batch sharded over
    devices on its first axis splits evenly on every device.
    """
    if steps == 1:
        return tower(inputs, training=training)
    rows = inputs.shape[0]
    if rows is not None and rows % steps:
        raise ValueError(
            f"accum_steps={steps} must divide the {rows} rows each tower sees."
        )
    # ops.shape: caption batches have a dynamic length on TensorFlow.
    strided = ops.reshape(inputs, (-1, steps, *ops.shape(inputs)[1:]))
    run = keras.remat(lambda part: tower(part, training=training))
    outputs = map_in_turn(run, ops.moveaxis(strided, 1, 0))

    def interleave(stacked):  # [steps, rows / steps, ...] -> [rows, ...]
        stacked = ops.moveaxis(stacked, 0, 1)
        return ops.reshape(stacked, (-1, *ops.shape(stacked)[2:]))

    return keras.tree.map_structure(interleave, outputs)


def _check_no_batch_statistics(*towers: keras.Model) -> None:
    for tower in towers:
        if any(
            isinstance(layer, keras.layers.BatchNormalization)
            for layer in nested_layers(tower)
        ):
            raise ValueError(
                f"accum_steps > 1 needs towers without batch norm; {tower.name} "
                "has some (use a ViT image tower, or accum_steps=1)."
            )


@keras.saving.register_keras_serializable(package=PACKAGE)
class DeCLIP(FitsAcrossWorkers, keras.Model):
    """DeCLIP: CLIP plus four supervision signals found inside the same pairs.

    The total loss is
    `clip_weight * MVS + ss_weight * SimSiam + mlm_weight * MLM + nn_weight * NNS`
    (see `declip_keras.models.losses`). A weight of 0 removes that branch, its heads and
    its computation, so `DeCLIP(..., ss_weight=0, mlm_weight=0, nn_weight=0)` fed
    one image view and one unmasked caption is plain CLIP.

    Args:
        image_encoder: a Keras model with an `embed_dim` attribute `D` mapping
            `[B, H, W, 3]` images to `[B, D]` features, e.g. `ViTImageEncoder` or
            `ResNetImageEncoder`.
        text_encoder: a `TextEncoder` with the same `embed_dim` `D`.
        clip_weight, ss_weight, mlm_weight, nn_weight: loss weights.
        multi_view: contrast all 2 x 2 image and text views (MVS); `False`
            keeps only the first image view against the first caption, the
            plain CLIP term (the paper's ablation without MVS).
        queue_size: rows of each replica's nearest-neighbour queue (DeCLIP:
            65,536).
        queue_replicas: neighbour queues the model holds, one per replica
            whose rows a training step sees (`declip_keras.models.layers
            .FeatureQueue`): under JAX data parallelism its devices, which
            `train` sets; 1 on one device and where each replica runs its own
            step (`tf.distribute`, torchrun), each then keeping its own queue.
        simsiam_projection_dim: width of the SimSiam projector (1024).
        simsiam_prediction_dim: bottleneck width of the SimSiam predictor (512).
        logit_scale_init: initial value of the learnt log-scale `p`
            (`ln(1 / 0.07)`); the similarities are multiplied by `exp(p)`.
        logit_scale_bounds: `(low, high)`, the clamp of `p` itself after
            every optimizer step (released configs: 3 and 6).
        max_scale: cap of the multiplier `s = min(exp(p), max_scale)` (100).
        accum_steps: in training, run each tower over its batch in this many
            equal micro-batches, keeping only their outputs and recomputing
            one micro-batch's activations at a time in the backward pass
            (OpenCLIP's gradient accumulation with cached embeddings): the
            towers' activation memory of one micro-batch for one more forward
            pass of each. The heads and losses run on the whole batch, so the
            step equals one without accumulation, SimSiam's batch norm and
            the MLM mean included. Towers with batch norm (ResNet) are
            refused: each micro-batch, and again its recomputation, would
            move their running statistics.
        seed: seed of the queue's random initial rows.

    Inputs: a dict with
        `"image_1"`, `"image_2"`: `[B, H, W, 3]` float, two augmented views
            (`"image_2"` optional unless `ss_weight > 0`); with device-side
            augmentation, un-normalised crops in [0, 1] with their
            `"image_1_photometric"`, `"image_2_photometric"` `[B, 12]`
            parameters, which the model applies first
            (`declip_keras.models.layers.PhotometricAugmentation`);
        `"token_ids"`: `[B, L]` caption ids, MLM-masked when `mlm_weight > 0`
            (the released code embeds the masked caption for the contrastive
            terms too);
        `"eda_token_ids"`: `[B, L]` the EDA-augmented caption (optional);
        `"mask_positions"`, `"mask_ids"`, `"mask_weights"`: `[B, M]`, as made by
            `declip_keras.data.masking.mask_tokens` (needed when `mlm_weight > 0`),
            with `"mask_rows"` `[B, M]` (optional) when packed by
            `declip_keras.data.masking.pack_targets`.

    Outputs: a dict with `"image_embeddings"` `[B, V_image, D]` and
        `"text_embeddings"` `[B, V_text, D]` (L2-normalised), and, for the
        active branches, `"simsiam_projections"` and `"simsiam_predictions"`
        `[B, 2, P]` and `"mlm_logits"` `[B, M, vocabulary_size]`.

    Example:
    >>> from declip_keras import synthetic_batch
    >>> model = DeCLIP.from_preset("tiny", vocabulary_size=1000)
    >>> batch = synthetic_batch(8, image_size=64, context_length=32,
    ...                         vocabulary_size=1000)
    >>> model.compile(optimizer="adamw")
    >>> history = model.fit(batch, batch_size=8, epochs=2, verbose=0)
    >>> keras.ops.shape(model.encode_image(batch["image_1"]))  # unit-norm rows
    (8, 128)
    """

    def __init__(
        self,
        image_encoder: keras.Model,
        text_encoder: keras.Model,
        clip_weight: float = MODEL_DEFAULTS["clip_weight"],
        ss_weight: float = MODEL_DEFAULTS["ss_weight"],
        mlm_weight: float = MODEL_DEFAULTS["mlm_weight"],
        nn_weight: float = MODEL_DEFAULTS["nn_weight"],
        multi_view: bool = MODEL_DEFAULTS["multi_view"],
        queue_size: int = MODEL_DEFAULTS["queue_size"],
        queue_replicas: int = MODEL_DEFAULTS["queue_replicas"],
        simsiam_projection_dim: int = MODEL_DEFAULTS["simsiam_projection_dim"],
        simsiam_prediction_dim: int = MODEL_DEFAULTS["simsiam_prediction_dim"],
        logit_scale_init: float = MODEL_DEFAULTS["logit_scale_init"],
        logit_scale_bounds: tuple[float, float] = MODEL_DEFAULTS["logit_scale_bounds"],
        max_scale: float = MODEL_DEFAULTS["max_scale"],
        accum_steps: int = MODEL_DEFAULTS["accum_steps"],
        seed: int | None = MODEL_DEFAULTS["seed"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        embed_dim = image_encoder.embed_dim
        text_dim = text_encoder.embed_dim
        if embed_dim != text_dim:
            raise ValueError(
                f"The image encoder outputs {embed_dim} features and the text "
                f"encoder {text_dim}; they must match."
            )
        if clip_weight + ss_weight + mlm_weight + nn_weight <= 0:
            raise ValueError("At least one loss weight must be positive.")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.clip_weight = float(clip_weight)
        self.ss_weight = float(ss_weight)
        self.mlm_weight = float(mlm_weight)
        self.nn_weight = float(nn_weight)
        self.multi_view = bool(multi_view)
        self.queue_size = queue_size
        self.queue_replicas = queue_replicas
        self.simsiam_projection_dim = simsiam_projection_dim
        self.simsiam_prediction_dim = simsiam_prediction_dim
        self.logit_scale_init = float(logit_scale_init)
        self.logit_scale_bounds = tuple(float(b) for b in logit_scale_bounds)
        self.max_scale = float(max_scale)
        self.accum_steps = accum_steps
        self.seed = seed

        dtype = self.dtype_policy
        self.logit_scale = self.add_weight(
            name="logit_scale",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(self.logit_scale_init),
            constraint=ClipValue(*self.logit_scale_bounds),
        )
        # float32 whatever the policy: the views it makes are the model's input.
        self.photometric = PhotometricAugmentation(dtype="float32", name="photometric")
        # No weights: built whether or not a batch uses it.
        self.photometric.build((None, None, None, 3))
        self._trackers = {
            term.name: keras.metrics.Mean(name=term.name) for term in self.active_terms
        }
        if self.ss_weight:
            p, h = simsiam_projection_dim, simsiam_prediction_dim
            # SimSiam heads; the spec gives their exact depth and widths.
            self.projector = keras.Sequential(
                _dense_bn(p, True, dtype, "proj1")
                + _dense_bn(p, True, dtype, "proj2")
                + _dense_bn(p, False, dtype, "proj3"),
                name="simsiam_projector",
            )
            self.predictor = keras.Sequential(
                _dense_bn(h, True, dtype, "pred1")
                + [
                    keras.layers.Dense(
                        p,
                        kernel_initializer=torch_kernel(),
                        bias_initializer=torch_bias(h),
                        dtype=dtype,
                        name="pred2_dense",
                    )
                ],
                name="simsiam_predictor",
            )
            self.projector.build((None, embed_dim))
            self.predictor.build((None, p))
        if self.mlm_weight:
            vocabulary_size = text_encoder.vocabulary_size
            self.mlm_head = keras.layers.Dense(
                vocabulary_size,
                kernel_initializer=torch_kernel(),
                bias_initializer=torch_bias(text_encoder.width),
                dtype=dtype,
                name="mlm_head",
            )
            self.mlm_head.build((None, None, text_encoder.width))
        if self.nn_weight:
            self.queue = FeatureQueue(
                queue_size, embed_dim, queue_replicas, seed=seed, name="nn_queue"
            )
        self._trackers["logit_scale"] = keras.metrics.Mean(name="logit_scale")
        self.built = True

    @property
    def term_weights(self) -> dict[str, float]:
        """Each loss term's weight, by the term's name."""
        return {term.name: getattr(self, term.weight) for term in LOSS_TERMS}

    @property
    def active_terms(self) -> tuple[LossTerm, ...]:
        """The loss terms of nonzero weight, those the model computes."""
        return tuple(term for term in LOSS_TERMS if getattr(self, term.weight))

    @property
    def accum_steps(self) -> int:
        """Micro-batches per training step (see the class arguments); a
        resumed run may change it."""
        return self._accum_steps

    @accum_steps.setter
    def accum_steps(self, steps: int) -> None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"accum_steps must be a positive integer, got {steps}.")
        if steps > 1:
            _check_no_batch_statistics(self.image_encoder, self.text_encoder)
        self._accum_steps = int(steps)

    @classmethod
    def from_preset(cls, preset: str, dtype=None, **overrides: Any) -> DeCLIP:
        """Builds a randomly initialised model from a named preset.

        Args:
            preset: a name in `declip_keras.PRESETS`: `"tiny"`, `"tiny32"`,
                `"rn50"` or `"vitb32"`.
            dtype: dtype policy, e.g. `"mixed_bfloat16"`.
            **overrides: any field of the preset (see `declip_keras.PRESETS`).
        """
        return cls.from_preset_config(preset_config(preset, **overrides), dtype)

    @classmethod
    def from_preset_config(cls, config: dict[str, Any], dtype=None) -> DeCLIP:
        """Builds the model a resolved preset (`preset_config`) describes."""
        return cls(
            image_encoder=build_image_encoder(config, dtype=dtype),
            text_encoder=build_text_encoder(config, dtype=dtype),
            dtype=dtype,
            **{name: config[name] for name in cls.argument_defaults()},
        )

    @classmethod
    def argument_defaults(cls) -> dict[str, Any]:
        """The arguments besides the two towers, with their defaults
        (`declip_keras.models.presets.MODEL_DEFAULTS`)."""
        return dict(MODEL_DEFAULTS)

    # --- inference -----------------------------------------------------------

    def encode_image(self, images, training: bool = False):
        """`[B, H, W, 3]` preprocessed images -> `[B, D]` unit-norm embeddings."""
        return losses.l2_normalize(self.image_encoder(images, training=training))

    def encode_text(self, token_ids, training: bool = False):
        """`[B, L]` token ids -> `[B, D]` unit-norm embeddings."""
        features = self.text_encoder(token_ids, training=training)["features"]
        return losses.l2_normalize(features, TEXT_NORM_EPSILON)

    def scale(self):
        """The multiplier `s = min(exp(p), max_scale)` of the similarities.

        As released, the cap edits the value only: the gradient reaching `p` is
        that of `exp(p)` at every `p`, so a scale above the cap can come down
        again (`min` in the graph would freeze it at the cap).
        """
        unclipped = ops.exp(self.logit_scale)
        capped = ops.minimum(unclipped, self.max_scale)
        return unclipped + ops.stop_gradient(capped - unclipped)

    # --- forward pass ----------------------------------------------------------

    def _check_inputs(self, inputs: dict) -> None:
        needed = [batch_format.IMAGE_1, batch_format.TOKEN_IDS]
        needed += [key for term in self.active_terms for key in term.inputs]
        missing = [key for key in needed if key not in inputs]
        if missing:
            raise ValueError(
                f"DeCLIP batch is missing field(s) {missing}; it has {sorted(inputs)}."
            )

    def call(self, inputs: dict, training=None) -> dict:
        self._check_inputs(inputs)
        images = [
            self.photometric(image, inputs[batch_format.PHOTOMETRIC[key]])
            if batch_format.PHOTOMETRIC[key] in inputs
            else image
            for key, image in zip(
                batch_format.IMAGE_VIEWS,
                _present(inputs, batch_format.IMAGE_VIEWS),
                strict=False,
            )
        ]
        texts = _present(inputs, batch_format.TEXT_VIEWS)
        batch = ops.shape(texts[0])[0]

        # One pass per tower over all views keeps the matmuls large.
        steps = self.accum_steps if training else 1
        image_features = _in_micro_batches(
            self.image_encoder, ops.concatenate(images, 0), steps, training
        )
        text_outputs = _in_micro_batches(
            self.text_encoder, ops.concatenate(texts, 0), steps, training
        )
        text_features = text_outputs["features"]

        image_embeddings = losses.l2_normalize(image_features)
        text_embeddings = losses.l2_normalize(text_features, TEXT_NORM_EPSILON)
        outputs = {
            "image_embeddings": ops.stack(
                _split_views(image_embeddings, len(images)), 1
            ),
            "text_embeddings": ops.stack(_split_views(text_embeddings, len(texts)), 1),
        }
        if self.ss_weight:
            # Per view, as in SimSiam: batch-norm statistics of one view at a time.
            projections = [
                self.projector(features, training=training)
                for features in _split_views(image_features, len(images))[:2]
            ]
            outputs["simsiam_projections"] = ops.stack(projections, 1)
            outputs["simsiam_predictions"] = ops.stack(
                [self.predictor(z, training=training) for z in projections], 1
            )
        if self.mlm_weight:
            sequence = text_outputs["sequence_output"][:batch]
            positions = ops.cast(inputs[batch_format.MASK_POSITIONS], "int32")
            if batch_format.MASK_ROWS in inputs:
                rows = ops.cast(inputs[batch_format.MASK_ROWS], "int32")
            else:
                rows = ops.expand_dims(ops.arange(batch, dtype="int32"), -1)
            # Row-major over the batch's tokens: target (r, p) is r * L + p.
            tokens = ops.reshape(sequence, (-1, ops.shape(sequence)[-1]))
            index = rows * ops.shape(sequence)[1] + positions
            outputs["mlm_logits"] = self.mlm_head(ops.take(tokens, index, axis=0))
        return outputs

    # --- losses ------------------------------------------------------------------

    def compute_loss_terms(
        self, inputs: dict, outputs: dict, training: bool = False
    ) -> dict[str, Any]:
        """Every active loss term, the weighted `"loss"` and the `"logit_scale"`.

        With `training=True` this step's text embeddings are enqueued in the
        nearest-neighbour queue after the neighbours have been looked up.
        """
        scale = self.scale()
        image_views = ops.unstack(
            ops.cast(outputs["image_embeddings"], "float32"), axis=1
        )
        text_views = ops.unstack(
            ops.cast(outputs["text_embeddings"], "float32"), axis=1
        )
        # Split over replicas, each one's rows are queries against the keys of
        # the global batch (gathered), so negatives do not shrink with replicas.
        offset = replica_offset(ops.shape(text_views[0])[0])
        terms = {}
        if self.clip_weight:
            pairs = slice(None) if self.multi_view else slice(1)
            terms["clip_loss"] = losses.multi_view_contrastive_loss(
                image_views[pairs],
                text_views[pairs],
                scale,
                [gather_replicas(v) for v in image_views[pairs]],
                [gather_replicas(v) for v in text_views[pairs]],
                offset,
            )
        if self.ss_weight:
            z1, z2 = ops.unstack(outputs["simsiam_projections"], axis=1)
            p1, p2 = ops.unstack(outputs["simsiam_predictions"], axis=1)
            terms["ss_loss"] = losses.simsiam_loss(p1, p2, z1, z2)
        if self.mlm_weight:
            terms["mlm_loss"] = losses.masked_lm_loss(
                outputs["mlm_logits"],
                inputs[batch_format.MASK_IDS],
                inputs[batch_format.MASK_WEIGHTS],
            )
        if self.nn_weight:
            neighbors = [losses.l2_normalize(self.queue.nearest(t)) for t in text_views]
            terms["nn_loss"] = ops.mean(
                ops.stack(
                    [
                        losses.nearest_neighbor_loss(
                            image, neighbor, scale, gather_replicas(neighbor), offset
                        )
                        for image in image_views
                        for neighbor in neighbors
                    ]
                )
            )
            if training:
                # Each replica's own rows into its own queue, the EDA caption's
                # first, as released.
                for view in reversed(text_views):
                    self.queue.enqueue(view)
        weights = self.term_weights
        terms["loss"] = sum(weights[name] * value for name, value in terms.items())
        terms["logit_scale"] = scale
        return terms

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        terms = self.compute_loss_terms(x, y_pred, training=training)
        for name, tracker in self._trackers.items():
            tracker.update_state(global_value(terms[name]))
        return scale_loss_for_replicas(global_value(terms["loss"]))

    # --- serialisation -----------------------------------------------------------

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "image_encoder": keras.saving.serialize_keras_object(
                    self.image_encoder
                ),
                "text_encoder": keras.saving.serialize_keras_object(self.text_encoder),
                **{name: getattr(self, name) for name in self.argument_defaults()},
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> DeCLIP:
        config = dict(config)
        for key in ("image_encoder", "text_encoder"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
