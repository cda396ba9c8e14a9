from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from helpers import gradient, small_batch, small_model, to_numpy

from declip_keras import DeCLIP
from declip_keras.models import losses

TERMS = ("clip_loss", "ss_loss", "mlm_loss", "nn_loss")


def info_nce(queries: np.ndarray, keys: np.ndarray, scale: float) -> float:
    logits = scale * queries.astype(np.float64) @ keys.astype(np.float64).T
    logits -= logits.max(1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-np.mean(np.diag(log_probs)))


def test_fit_trains_every_term_on_a_fixed_batch():
    model = small_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(small_batch(), epochs=6, batch_size=8, verbose=0).history
    assert set(history) == {"loss", "logit_scale", *TERMS}
    for name, values in history.items():
        assert np.all(np.isfinite(values)), name
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["clip_loss"][-1] < history["clip_loss"][0]
    assert history["mlm_loss"][-1] < history["mlm_loss"][0]


def test_total_is_the_weighted_sum_of_the_terms():
    model = small_model(clip_weight=0.5, ss_weight=0.1, mlm_weight=0.3, nn_weight=0.7)
    batch = small_batch()
    terms = model.compute_loss_terms(batch, model(batch, training=True))
    expected = sum(
        w * float(to_numpy(terms[n]))
        for w, n in zip((0.5, 0.1, 0.3, 0.7), TERMS, strict=True)
    )
    np.testing.assert_allclose(float(to_numpy(terms["loss"])), expected, rtol=1e-6)


def test_contrastive_term_averages_the_four_view_pairs():
    model = small_model()
    batch = small_batch()
    terms = model.compute_loss_terms(batch, model(batch))
    images = [to_numpy(model.encode_image(batch[k])) for k in ("image_1", "image_2")]
    texts = [
        to_numpy(model.encode_text(batch[k])) for k in ("token_ids", "eda_token_ids")
    ]
    scale = math.exp(model.logit_scale_init)
    expected = np.mean(
        [
            0.5 * (info_nce(i, t, scale) + info_nce(t, i, scale))
            for i in images
            for t in texts
        ]
    )
    np.testing.assert_allclose(float(to_numpy(terms["clip_loss"])), expected, rtol=1e-4)


def test_without_multi_view_the_contrastive_term_is_first_views_only():
    model = small_model(multi_view=False)
    batch = small_batch()
    terms = model.compute_loss_terms(batch, model(batch))
    image = to_numpy(model.encode_image(batch["image_1"]))
    text = to_numpy(model.encode_text(batch["token_ids"]))
    scale = math.exp(model.logit_scale_init)
    expected = 0.5 * (info_nce(image, text, scale) + info_nce(text, image, scale))
    np.testing.assert_allclose(float(to_numpy(terms["clip_loss"])), expected, rtol=1e-4)
    restored = model.from_config(model.get_config())
    assert restored.multi_view is False


def test_zero_weights_remove_their_branches_and_give_plain_clip():
    model = small_model(clip_weight=1.0, ss_weight=0.0, mlm_weight=0.0, nn_weight=0.0)
    for head in ("projector", "predictor", "mlm_head", "queue"):
        assert not hasattr(model, head)
    batch = small_batch()
    clip_batch = {"image_1": batch["image_1"], "token_ids": batch["eda_token_ids"]}
    outputs = model(clip_batch)
    assert set(outputs) == {"image_embeddings", "text_embeddings"}
    image = to_numpy(model.encode_image(clip_batch["image_1"]))
    text = to_numpy(model.encode_text(clip_batch["token_ids"]))
    expected = 0.5 * (
        info_nce(image, text, 14.285714) + info_nce(text, image, 14.285714)
    )
    loss = model.compute_loss_terms(clip_batch, outputs)["loss"]
    np.testing.assert_allclose(float(to_numpy(loss)), expected, rtol=1e-4)
    model.compile(optimizer="adamw")
    history = model.fit(clip_batch, epochs=1, batch_size=8, verbose=0).history
    assert set(history) == {"loss", "clip_loss", "logit_scale"}


def test_missing_field_names_the_field():
    model = small_model()
    batch = small_batch()
    del batch["image_2"]
    with pytest.raises(ValueError, match="image_2"):
        model(batch)
    batch = small_batch()
    del batch["mask_ids"]
    with pytest.raises(ValueError, match="mask_ids"):
        model(batch)


def test_queue_updates_in_training_only_and_after_the_lookup():
    model = small_model(clip_weight=0.0, ss_weight=0.0, mlm_weight=0.0, nn_weight=1.0)
    batch = small_batch()
    before = to_numpy(model.queue.features)[0].copy()
    texts = [
        to_numpy(model.encode_text(batch[k])) for k in ("token_ids", "eda_token_ids")
    ]
    images = [to_numpy(model.encode_image(batch[k])) for k in ("image_1", "image_2")]

    # The neighbour term looks up the queue as it was before this step.
    scale = math.exp(model.logit_scale_init)
    neighbors = [before[np.argmax(t @ before.T, axis=1)] for t in texts]
    expected = np.mean([info_nce(i, n, scale) for i in images for n in neighbors])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    evaluated = model.evaluate(batch, batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(evaluated["nn_loss"], expected, rtol=1e-4)
    np.testing.assert_array_equal(to_numpy(model.queue.features)[0], before)
    assert int(to_numpy(model.queue.pointer)) == 0

    history = model.fit(batch, epochs=1, batch_size=8, shuffle=False, verbose=0).history
    np.testing.assert_allclose(history["nn_loss"][0], expected, rtol=1e-4)
    after = to_numpy(model.queue.features)[0]
    # As released: the EDA captions' rows first, then the masked captions'.
    np.testing.assert_allclose(
        after[:16], np.concatenate(texts[::-1]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(after[16:], before[16:])
    assert int(to_numpy(model.queue.pointer)) == 16


def test_temperature_starts_at_clip_init_and_is_clamped_after_a_step():
    model = small_model()
    np.testing.assert_allclose(float(to_numpy(model.scale())), 1 / 0.07, rtol=1e-5)
    model.compile(optimizer="adamw")
    model.fit(small_batch(), epochs=1, batch_size=8, verbose=0)
    log_scale = float(to_numpy(model.logit_scale))
    assert 3.0 <= log_scale <= 6.0
    big = small_model(logit_scale_init=5.0)
    assert float(to_numpy(big.scale())) == pytest.approx(100.0)


def test_temperature_above_the_cap_still_gets_the_gradient_of_exp():
    """As released, the cap at 100 edits the scale's value only: at p = 5
    (scale exp(5) = 148, capped to 100) one SGD step moves p by the learning
    rate times exp(5) * dL/ds, so a capped scale can still come down."""
    model = small_model(ss_weight=0.0, mlm_weight=0.0, nn_weight=0.0)
    model.logit_scale.assign(5.0)
    batch = small_batch()
    outputs = model(batch)
    images = list(np.moveaxis(to_numpy(outputs["image_embeddings"]), 1, 0))
    texts = list(np.moveaxis(to_numpy(outputs["text_embeddings"]), 1, 0))
    loss_of_scale = lambda s: losses.multi_view_contrastive_loss(images, texts, s)  # noqa: E731
    gradient_of_scale = float(gradient(loss_of_scale, np.float32(100.0)))
    assert abs(gradient_of_scale) > 1e-3  # a gradient the step can show
    learning_rate = 1e-3
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate))
    model.fit(batch, epochs=1, batch_size=8, shuffle=False, verbose=0)
    moved = (5.0 - float(to_numpy(model.logit_scale))) / learning_rate
    expected = model.clip_weight * math.exp(5.0) * gradient_of_scale
    np.testing.assert_allclose(moved, expected, rtol=2e-3)
    # The value used is the cap's.
    assert float(to_numpy(model.scale())) == pytest.approx(100.0)


def test_mlm_logits_are_read_at_the_masked_positions():
    model = small_model(clip_weight=0.0, ss_weight=0.0, nn_weight=0.0)
    batch = small_batch()
    logits = to_numpy(model(batch)["mlm_logits"])
    sequence = to_numpy(model.text_encoder(batch["token_ids"])["sequence_output"])
    gathered = np.take_along_axis(sequence, batch["mask_positions"][..., None], axis=1)
    kernel, bias = (to_numpy(w) for w in model.mlm_head.weights)
    np.testing.assert_allclose(logits, gathered @ kernel + bias, rtol=1e-4, atol=1e-4)


def test_save_and_load_restores_config_weights_and_queue(tmp_path):
    model = small_model()
    model.compile(optimizer="adamw")
    batch = small_batch()
    model.fit(batch, epochs=2, batch_size=8, verbose=0)
    model.save(tmp_path / "declip.keras")
    restored = keras.models.load_model(tmp_path / "declip.keras")
    assert isinstance(restored, DeCLIP)
    assert restored.get_config() == model.get_config()
    for a, b in zip(model.weights, restored.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert int(to_numpy(restored.queue.pointer)) == 32
    np.testing.assert_allclose(
        to_numpy(restored.encode_image(batch["image_1"])),
        to_numpy(model.encode_image(batch["image_1"])),
        rtol=1e-5,
        atol=1e-6,
    )


def test_unknown_preset_field_is_an_error():
    with pytest.raises(ValueError, match="no field"):
        DeCLIP.from_preset("tiny", embedding_size=3)
    with pytest.raises(ValueError, match="Unknown preset"):
        DeCLIP.from_preset("rn101")


def test_text_embeddings_use_the_released_epsilon():
    model = small_model()
    ids = small_batch()["token_ids"]
    raw = to_numpy(model.text_encoder(ids)["features"]).astype(np.float64)
    expected = raw / (np.linalg.norm(raw, axis=1, keepdims=True) + 1e-10)
    np.testing.assert_allclose(to_numpy(model.encode_text(ids)), expected, rtol=1e-5)


def test_captions_trimmed_to_a_bucket_give_the_same_embeddings_and_losses():
    """Padding after the end token changes nothing: the tower is causal."""
    from declip_keras.data.batch_format import MLM_TARGETS
    from declip_keras.data.masking import mlm_selection_length, pack_targets
    from declip_keras.data.pipeline import trim_captions
    from declip_keras.data.synthetic import synthetic_batch

    model = small_model(context_length=32)
    short = uneven_targets(
        synthetic_batch(8, 32, context_length=8, vocabulary_size=1000, seed=2)
    )
    padded = dict(short)
    for key in ("token_ids", "eda_token_ids"):
        padded[key] = np.pad(short[key], ((0, 0), (0, 24)))  # CLIP pads with 0
    # The MLM target slots a 32-token context gets, the extra ones empty.
    slots = mlm_selection_length(32)
    for key in MLM_TARGETS:
        padded[key] = np.pad(short[key], ((0, 0), (0, slots - short[key].shape[1])))
    trimmed = trim_captions(padded, 32, buckets=(8, 16))
    trimmed.update(pack_targets(trimmed))
    trimmed = {key: np.asarray(value) for key, value in trimmed.items()}
    for key in ("token_ids", "eda_token_ids"):
        np.testing.assert_array_equal(trimmed[key], short[key])
    # Packed into fewer slots than the busiest caption's 3; no target is lost.
    assert trimmed["mask_weights"].shape[1] == 2
    assert trimmed["mask_weights"].sum() == short["mask_weights"].sum() > 0
    np.testing.assert_allclose(
        to_numpy(model.encode_text(short["token_ids"])),
        to_numpy(model.encode_text(padded["token_ids"])),
        rtol=1e-5,
        atol=1e-6,
    )
    full = model.compute_loss_terms(padded, model(padded))
    cut = model.compute_loss_terms(trimmed, model(trimmed))
    assert set(full) == set(cut)
    for name in full:
        np.testing.assert_allclose(to_numpy(cut[name]), to_numpy(full[name]), rtol=1e-5)


def uneven_targets(batch: dict) -> dict:
    """Caption i keeps its first i % 4 MLM targets (0 to 3), so that packing
    them moves targets to other rows."""
    batch = dict(batch)
    rows, slots = np.indices(batch["mask_weights"].shape)
    keep = slots < rows % 4
    for key in ("mask_positions", "mask_ids", "mask_weights"):
        batch[key] = np.where(keep, batch[key], 0).astype(batch[key].dtype)
    return batch


def test_targets_packed_per_replica_slice_are_read_from_that_slice():
    """What each replica's step sees under `tf.distribute`: its half of a
    batch packed in two slices gives its half's unpacked MLM loss."""
    from declip_keras.data.masking import pack_targets

    model = small_model(clip_weight=0.0, ss_weight=0.0, nn_weight=0.0)
    batch = uneven_targets(small_batch())
    packed = {k: np.asarray(v) for k, v in pack_targets(batch, groups=2).items()}
    assert packed["mask_weights"].shape == (8, 2)
    for half in (slice(0, 4), slice(4, 8)):
        alone = {key: value[half] for key, value in batch.items()}
        sliced = {**alone, **{key: value[half] for key, value in packed.items()}}
        want = model.compute_loss_terms(alone, model(alone))["mlm_loss"]
        got = model.compute_loss_terms(sliced, model(sliced))["mlm_loss"]
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5)


def _jax_on_cpu() -> bool:
    from declip_keras.backend import accelerator

    return keras.backend.backend() == "jax" and accelerator()[0] == "cpu"


def test_float16_keeps_the_loss_terms_in_float32():
    """Mixed float16: the towers compute in float16, every loss term is
    float32 (on every backend: the forward pass runs on XLA:CPU too)."""
    model = small_model(vocabulary_size=1000, dtype="mixed_float16")
    batch = small_batch()
    outputs = model(batch, training=True)
    assert (
        keras.backend.standardize_dtype(outputs["image_embeddings"].dtype) == "float16"
    )
    terms = model.compute_loss_terms(batch, outputs)
    for name, value in terms.items():
        assert keras.backend.standardize_dtype(value.dtype) == "float32", name


@pytest.mark.skipif(
    _jax_on_cpu(),
    reason="the gradient of Keras' float16 attention under JAX is a float16 dot "
    "with float32 accumulation, which XLA:CPU lacks (GPUs have it)",
)
def test_float16_with_loss_scaling_trains():
    """Dynamic loss scaling keeps a float16 fit finite and counts every step."""
    from declip_keras.compat import CountingLossScaleOptimizer

    model = small_model(vocabulary_size=1000, dtype="mixed_float16")
    batch = small_batch()
    model.compile(optimizer=CountingLossScaleOptimizer(keras.optimizers.AdamW(1e-3)))
    history = model.fit(batch, epochs=3, batch_size=8, verbose=0).history
    assert all(np.isfinite(values).all() for values in history.values())
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3


def _one_sgd_step(model: DeCLIP, batch: dict) -> tuple[float, list[np.ndarray]]:
    """The loss `fit` logs and each weight's change in one plain-SGD step of
    rate 1 (which is minus the gradient) on `batch`, taken whole and in order
    (the queue's rows follow the batch's)."""
    before = [to_numpy(v) for v in model.trainable_variables]
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    size = len(next(iter(batch.values())))
    history = model.fit(
        batch, batch_size=size, epochs=1, shuffle=False, verbose=0
    ).history
    after = [to_numpy(v) for v in model.trainable_variables]
    return history["loss"][0], [b - a for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize("method", ["clip", "declip"])
def test_accumulation_over_micro_batches_equals_one_step_on_the_whole_batch(method):
    """accum_steps=2 on a batch of 2B gives `fit` the loss and every gradient
    of one step on 2B: the towers run B rows at a time and the loss still
    sees all 2B pairs as negatives (DeCLIP's heads and losses run on the
    whole batch, and transformer towers hold no batch statistics)."""
    weights = (
        {}
        if method == "declip"
        else {"ss_weight": 0, "mlm_weight": 0, "nn_weight": 0, "clip_weight": 1}
    )
    whole = small_model(**weights)
    accumulated = small_model(accum_steps=2, **weights)
    accumulated.set_weights(whole.get_weights())
    batch = small_batch(8)
    if method == "clip":
        batch = {key: batch[key] for key in ("image_1", "token_ids")}

    loss, steps = _one_sgd_step(whole, batch)
    rows_seen = []
    tower_call = accumulated.image_encoder.call

    def recording_call(images, *args, **kwargs):
        rows_seen.append(images.shape[0])
        return tower_call(images, *args, **kwargs)

    accumulated.image_encoder.call = recording_call
    accumulated_loss, accumulated_steps = _one_sgd_step(accumulated, batch)
    assert accumulated_loss == pytest.approx(loss, rel=1e-5)
    assert max(np.abs(s).max() for s in steps) > 0
    for variable, step, got in zip(
        whole.trainable_variables, steps, accumulated_steps, strict=True
    ):
        np.testing.assert_allclose(
            got, step, rtol=1e-4, atol=1e-6, err_msg=variable.path
        )
    # The step's tower calls see half of the image views' rows (a call that
    # only builds the model may see them all).
    image_rows = 8 * sum(key.startswith("image_") for key in batch)
    assert image_rows // 2 in rows_seen, rows_seen
    assert set(rows_seen) <= {image_rows, image_rows // 2}, rows_seen
    # And the state the step leaves: the neighbour queue's rows and pointer,
    # SimSiam's batch-norm moving statistics.
    state = [v.path for v in whole.non_trainable_variables]
    if method == "declip":
        assert {"nn_queue/features", "simsiam_projector/proj1_bn/moving_mean"} <= set(
            state
        )
    for variable, got in zip(
        whole.non_trainable_variables, accumulated.non_trainable_variables, strict=True
    ):
        np.testing.assert_allclose(
            to_numpy(got), to_numpy(variable), rtol=1e-5, atol=1e-6,
            err_msg=variable.path,
        )  # fmt: skip


def test_accumulation_refuses_towers_with_batch_norm():
    """Each micro-batch and its recomputation would move the running means."""
    resnet = {
        "image_encoder": "resnet",
        "vision_width": 8,
        "vision_heads": 2,
        "vision_layers": (1, 1, 1, 1),
        "embed_dim": 32,
    }
    model = small_model(**resnet)
    with pytest.raises(ValueError, match="image_encoder has some"):
        small_model(accum_steps=2, **resnet)
    with pytest.raises(ValueError, match="image_encoder has some"):
        model.accum_steps = 2  # as a resumed run would set it
    with pytest.raises(ValueError, match="positive integer"):
        model.accum_steps = 0
