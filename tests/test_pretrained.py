"""Pretrained CLIP weights: a reference forward pass of OpenAI's published
ViT CLIP, written here in plain torch on its own `state_dict` layout, and the
imported model must compute the same embeddings on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_numpy

from declip_keras import DeCLIP
from declip_keras.interop.pretrained import (
    WeightsError,
    import_checkpoint,
    load_openai_clip,
    openai_clip_overrides,
    read_state_dict,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Small, but OpenAI's layout: 64-wide heads, 4x MLP, a 2-block tower each side.
WIDTH, LAYERS, PATCH, IMAGE, CONTEXT, TOKENS, EMBED = 128, 2, 8, 32, 16, 999, 32


def random_openai_state(
    seed: int = 0,
    tokens: int = TOKENS,
    width: int = WIDTH,
    text_width: int = WIDTH,
    layers: int = LAYERS,
    patch: int = PATCH,
    image: int = IMAGE,
    context: int = CONTEXT,
    embed: int = EMBED,
) -> dict[str, torch.Tensor]:
    """Random tensors under OpenAI's CLIP ViT keys and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix, w):
        state = {}
        for i in range(layers):
            b = f"{prefix}.{i}"
            for norm in ("ln_1", "ln_2"):
                state[f"{b}.{norm}.weight"] = 1 + rand(w)
                state[f"{b}.{norm}.bias"] = rand(w)
            state[f"{b}.attn.in_proj_weight"] = rand(3 * w, w)
            state[f"{b}.attn.in_proj_bias"] = rand(3 * w)
            state[f"{b}.attn.out_proj.weight"] = rand(w, w)
            state[f"{b}.attn.out_proj.bias"] = rand(w)
            state[f"{b}.mlp.c_fc.weight"] = rand(4 * w, w)
            state[f"{b}.mlp.c_fc.bias"] = rand(4 * w)
            state[f"{b}.mlp.c_proj.weight"] = rand(w, 4 * w)
            state[f"{b}.mlp.c_proj.bias"] = rand(w)
        return state

    grid = image // patch
    return {
        "visual.conv1.weight": rand(width, 3, patch, patch),
        "visual.class_embedding": rand(width),
        "visual.positional_embedding": rand(grid * grid + 1, width),
        "visual.ln_pre.weight": 1 + rand(width),
        "visual.ln_pre.bias": rand(width),
        **blocks("visual.transformer.resblocks", width),
        "visual.ln_post.weight": 1 + rand(width),
        "visual.ln_post.bias": rand(width),
        "visual.proj": rand(width, embed),
        "token_embedding.weight": rand(tokens, text_width),
        "positional_embedding": rand(context, text_width),
        **blocks("transformer.resblocks", text_width),
        "ln_final.weight": 1 + rand(text_width),
        "ln_final.bias": rand(text_width),
        "text_projection": rand(text_width, embed),
        "logit_scale": torch.tensor(4.2),
    }


def reference_transformer(x, s, prefix, mask=None):
    """OpenAI's residual attention blocks: torch's multi-head attention on
    `[L, B, W]`, QuickGELU MLP."""
    w = x.shape[-1]
    x = x.transpose(0, 1)
    i = 0
    while f"{prefix}.{i}.ln_1.weight" in s:
        b = f"{prefix}.{i}"
        h = F.layer_norm(x, (w,), s[f"{b}.ln_1.weight"], s[f"{b}.ln_1.bias"])
        h, _ = F.multi_head_attention_forward(
            h, h, h, w, w // 64,
            s[f"{b}.attn.in_proj_weight"], s[f"{b}.attn.in_proj_bias"],
            None, None, False, 0.0,
            s[f"{b}.attn.out_proj.weight"], s[f"{b}.attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask,
        )  # fmt: skip
        x = x + h
        h = F.layer_norm(x, (w,), s[f"{b}.ln_2.weight"], s[f"{b}.ln_2.bias"])
        h = F.linear(h, s[f"{b}.mlp.c_fc.weight"], s[f"{b}.mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, s[f"{b}.mlp.c_proj.weight"], s[f"{b}.mlp.c_proj.bias"])
        i += 1
    return x.transpose(0, 1)


def reference_image(images: np.ndarray, s, normalize: bool = True) -> np.ndarray:
    conv = s["visual.conv1.weight"]
    w = conv.shape[0]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
    x = F.conv2d(x, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, w)
    x = torch.cat([cls, x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    x = reference_transformer(x, s, "visual.transformer.resblocks")
    x = F.layer_norm(
        x[:, 0], (w,), s["visual.ln_post.weight"], s["visual.ln_post.bias"]
    )
    x = x @ s["visual.proj"]
    return (F.normalize(x, dim=-1) if normalize else x).numpy()


def reference_text(ids: np.ndarray, s, sequence: bool = False) -> np.ndarray:
    """CLIP's text tower; DeCLIP's projection has a bias; `sequence`: the
    final-layer-norm sequence instead (what DeCLIP's MLM head reads)."""
    ids = torch.from_numpy(ids).long()
    length, w = ids.shape[1], s["ln_final.weight"].shape[0]
    x = s["token_embedding.weight"][ids] + s["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = reference_transformer(x, s, "transformer.resblocks", mask)
    x = F.layer_norm(x, (w,), s["ln_final.weight"], s["ln_final.bias"])
    if sequence:
        return x.numpy()
    x = x[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]
    x = x + s.get("text_projection.bias", 0)
    return F.normalize(x, dim=-1).numpy()


def declip_ids(ids: np.ndarray, tokens: int = TOKENS) -> np.ndarray:
    """CLIP ids in DeCLIP's layout: the start and end ids move up one."""
    return np.where(ids >= tokens - 2, ids + 1, ids).astype(np.int32)


def captions(
    rng: np.random.Generator, count: int, context: int = CONTEXT, tokens: int = TOKENS
) -> np.ndarray:
    """Random captions ending with the end token (the largest id), padded."""
    ids = np.zeros((count, context), np.int32)
    for row, length in enumerate(rng.integers(3, context + 1, count)):
        ids[row, : length - 1] = rng.integers(1, tokens - 1, length - 1)
        ids[row, length - 1] = tokens - 1
    return ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An OpenCLIP-style training checkpoint: `state_dict` under a key, with
    DistributedDataParallel's `module.` prefixes."""
    state = random_openai_state()
    path = tmp_path_factory.mktemp("clip") / "epoch_1.pt"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path
    )
    return path, state


def imported(path) -> DeCLIP:
    state = read_state_dict(path)
    model = DeCLIP.from_preset("vitb32", **openai_clip_overrides(state), seed=0)
    load_openai_clip(model, state)
    return model


def test_imported_towers_compute_the_reference_embeddings(checkpoint):
    path, state = checkpoint
    model = imported(path)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = captions(rng, 5)
    np.testing.assert_allclose(
        to_numpy(model.encode_image(images)), reference_image(images, state), atol=1e-4
    )
    np.testing.assert_allclose(
        to_numpy(model.encode_text(declip_ids(ids))),
        reference_text(ids, state),
        atol=1e-4,
    )
    assert float(to_numpy(model.logit_scale)) == pytest.approx(4.2)


def test_architecture_is_read_from_the_shapes(checkpoint):
    overrides = openai_clip_overrides(read_state_dict(checkpoint[0]))
    assert overrides["vision_layers"] == overrides["text_layers"] == LAYERS
    assert overrides["vision_heads"] == WIDTH // 64 and overrides["patch_size"] == PATCH
    assert overrides["image_size"] == IMAGE and overrides["context_length"] == CONTEXT
    assert overrides["vocabulary_size"] == TOKENS + 1  # DeCLIP's mask token
    assert overrides["embed_dim"] == EMBED


def test_a_mismatch_names_the_key_and_changes_nothing(checkpoint):
    path, state = checkpoint
    model = imported(path)
    before = [to_numpy(v) for v in model.weights]
    bad = read_state_dict(path)
    bad["transformer.resblocks.1.mlp.c_fc.bias"] = np.zeros(7, np.float32)
    with pytest.raises(WeightsError, match=r"resblocks\.1\.mlp\.c_fc\.bias has shape"):
        load_openai_clip(model, bad)
    del bad["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(
        WeightsError, match="no 'transformer.resblocks.1.mlp.c_fc.bias'"
    ):
        load_openai_clip(model, bad)
    deeper = {
        **read_state_dict(path),
        "visual.transformer.resblocks.2.ln_1.weight": bad["visual.ln_pre.weight"],
    }
    with pytest.raises(WeightsError, match="no place for 1"):
        load_openai_clip(model, deeper)
    for old, variable in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, to_numpy(variable))


def test_the_packages_tokenizer_feeds_an_imported_clip_what_openai_s_does():
    """The same string: this package's ids (DeCLIP's special ids) into the
    imported model, OpenAI's tokenizer's ids (published: open_clip's
    SimpleTokenizer) into the reference; the embeddings agree."""
    from declip_keras.data.tokenizer import CaptionTokenizer

    state = random_openai_state(tokens=49408)
    model = DeCLIP.from_preset("vitb32", **openai_clip_overrides(state), seed=0)
    load_openai_clip(model, {k: v.numpy() for k, v in state.items()})
    ours = np.asarray(CaptionTokenizer(CONTEXT)(["a photo of a cat"]), np.int32)
    openai = np.zeros((1, CONTEXT), np.int32)
    openai[0, :7] = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours[0, :7].tolist() == [49407, 320, 1125, 539, 320, 2368, 49408]
    np.testing.assert_allclose(
        to_numpy(model.encode_text(ours)), reference_text(openai, state), atol=1e-4
    )


@pytest.mark.one_backend("tensorflow", reason="the command line; one backend")
def test_a_reference_checkpoint_imports_evaluates_and_exports(tmp_path, capsys):
    """As a user meets it: `import`, then `eval` zero-shot on the built-in
    digits and `export`, from a checkpoint the reference layout wrote (CLIP's
    full vocabulary, so the package's BPE ids fit)."""
    import json

    from declip_keras.cli import main
    from declip_keras.data.builtin import make_demo_data

    checkpoint = tmp_path / "clip.pt"
    torch.save(random_openai_state(tokens=49408), checkpoint)
    model = tmp_path / "imported.keras"
    assert main(["import", str(checkpoint), str(model)]) == 0
    assert main(["import", str(checkpoint), str(model)]) == 2  # never overwritten
    assert "exists; pass --overwrite" in capsys.readouterr().err
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    assert main(["import", str(garbage), str(tmp_path / "x.keras")]) == 2
    error = capsys.readouterr().err
    assert "notes.pt is not a torch checkpoint" in error and error.count("\n") == 1

    demo = tmp_path / "demo"
    make_demo_data(demo, emoji_views=1, num_shards=1, eval_digits=100)
    results = tmp_path / "results.json"
    args = ["eval", str(model), "--zero-shot", str(demo / "eval" / "digits.tfrecord")]
    args += ["--classnames", str(demo / "eval" / "digits_classnames.json")]
    assert main([*args, "--output", str(results)]) == 0
    top1 = json.loads(results.read_text())["zero_shot"]["top1"]
    assert 0.0 <= top1 <= 1.0

    assert main(["export", str(model), str(tmp_path / "export")]) == 0
    info = json.loads(next((tmp_path / "export").rglob("export.json")).read_text())
    assert info["context_length"] == CONTEXT


@pytest.mark.one_backend("torch", reason="the command line; one backend")
def test_training_starts_from_a_checkpoint_with_the_image_tower_locked(
    shape_shards, tmp_path
):
    """`train --init-from CLIP.pt --lock-image`: the run takes the checkpoint's
    architecture and weights; the image tower ends as it started, the text
    tower trains."""
    from declip_keras.cli import main
    from declip_keras.training.runs import load_trained_model

    checkpoint = tmp_path / "clip.pt"
    torch.save(random_openai_state(tokens=49408), checkpoint)
    start = imported(checkpoint)
    output = tmp_path / "run"
    args = ["train", "--data", shape_shards, "--output", str(output)]
    args += ["--init-from", str(checkpoint), "--lock-image", "--batch-size", "8"]
    args += ["--steps", "2", "--checkpoint-every", "2", "--set", "queue_size=64"]
    assert main(args) == 0
    trained = load_trained_model(output)
    for before, after in zip(
        start.image_encoder.weights, trained.image_encoder.weights, strict=True
    ):
        np.testing.assert_array_equal(to_numpy(before), to_numpy(after))
    changed = [
        not np.array_equal(to_numpy(before), to_numpy(after))
        for before, after in zip(
            start.text_encoder.weights, trained.text_encoder.weights, strict=True
        )
    ]
    assert any(changed)


def test_a_keras_hub_preset_folder_imports_to_keras_hubs_embeddings(tmp_path):
    """A keras-hub `CLIPBackbone` (random, saved with `save_to_preset`) is the
    reference: its own pooling and projections give the embeddings."""
    import keras
    import keras_hub

    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=PATCH, hidden_dim=WIDTH, num_layers=LAYERS, num_heads=2,
        intermediate_dim=4 * WIDTH, image_shape=(IMAGE, IMAGE, 3),
    )  # fmt: skip
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=TOKENS, embedding_dim=WIDTH, hidden_dim=WIDTH,
        num_layers=LAYERS, num_heads=2, intermediate_dim=4 * WIDTH,
        max_sequence_length=CONTEXT,
    )  # fmt: skip
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=EMBED)
    # As in keras-hub's published presets (a random backbone has zeros).
    positions = vision.embedding.position_ids
    positions.assign(keras.ops.arange(positions.shape[-1], dtype=positions.dtype)[None])
    backbone.save_to_preset(str(tmp_path / "preset"))

    model = import_checkpoint(tmp_path / "preset")
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = captions(rng, 5)

    def unit(x):
        x = to_numpy(x)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    np.testing.assert_allclose(
        to_numpy(model.encode_image(images)),
        unit(backbone.get_vision_embeddings(images)),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        to_numpy(model.encode_text(declip_ids(ids))),
        unit(backbone.get_text_embeddings(ids)),
        atol=1e-4,
    )


def released_declip_state(seed: int = 0, projection: int = 48, prediction: int = 16):
    """A random checkpoint in the released DeCLIP code's layout (its
    `DECLIP` module under DistributedDataParallel), and the same tensors in
    the reference's names."""
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    # DeCLIP's vocabulary already holds the mask token: one row more.
    clip = random_openai_state(seed, tokens=TOKENS + 1)
    reference = dict(clip)
    reference["text_projection"] = clip["text_projection"]
    reference["text_projection.bias"] = rand(EMBED)
    released = {}
    for key, value in clip.items():
        if key.startswith("visual."):
            released[key] = value
        elif key == "logit_scale":
            released[key] = value.reshape(1)
        elif key == "text_projection":
            released["encode_text.text_projection.weight"] = value.T.contiguous()
        else:
            released[f"encode_text.{key}"] = value
    released["encode_text.text_projection.bias"] = reference["text_projection.bias"]
    heads = {}
    widths = {"projector": [(EMBED, projection)] + [(projection, projection)] * 2}
    for i, (into, out) in enumerate(widths["projector"], 1):
        heads[f"projector.linear{i}.weight"] = rand(out, into, scale=0.2)
        heads[f"projector.linear{i}.bias"] = rand(out)
        heads[f"projector.bn{i}.weight"] = 1 + rand(out)
        heads[f"projector.bn{i}.bias"] = rand(out)
        heads[f"projector.bn{i}.running_mean"] = rand(out)
        heads[f"projector.bn{i}.running_var"] = 1 + rand(out).abs()
        heads[f"projector.bn{i}.num_batches_tracked"] = torch.tensor(7)
    heads["predictor.linear1.weight"] = rand(prediction, projection, scale=0.2)
    heads["predictor.linear1.bias"] = rand(prediction)
    heads["predictor.bn1.weight"] = 1 + rand(prediction)
    heads["predictor.bn1.bias"] = rand(prediction)
    heads["predictor.bn1.running_mean"] = rand(prediction)
    heads["predictor.bn1.running_var"] = 1 + rand(prediction).abs()
    heads["predictor.layer2.weight"] = rand(projection, prediction, scale=0.2)
    heads["predictor.layer2.bias"] = rand(projection)
    heads["text_label_predictor.weight"] = rand(TOKENS + 1, WIDTH)
    heads["text_label_predictor.bias"] = rand(TOKENS + 1)
    released.update(heads, **{"nn_replacer_text.bank": rand(64, EMBED)})
    return {f"module.{k}": v for k, v in released.items()}, {**reference, **heads}


def reference_heads(features: torch.Tensor, s) -> tuple[np.ndarray, np.ndarray]:
    """The released SimSiam projector and predictor in inference mode."""

    def linear_bn(x, linear, bn):
        x = F.linear(x, s[f"{linear}.weight"], s[f"{linear}.bias"])
        return F.batch_norm(
            x, s[f"{bn}.running_mean"], s[f"{bn}.running_var"],
            s[f"{bn}.weight"], s[f"{bn}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    z = F.relu(linear_bn(features, "projector.linear1", "projector.bn1"))
    z = F.relu(linear_bn(z, "projector.linear2", "projector.bn2"))
    z = linear_bn(z, "projector.linear3", "projector.bn3")
    p = F.relu(linear_bn(z, "predictor.linear1", "predictor.bn1"))
    p = F.linear(p, s["predictor.layer2.weight"], s["predictor.layer2.bias"])
    return z.numpy(), p.numpy()


def test_a_released_declip_checkpoint_imports_towers_and_heads(tmp_path):
    """Towers, text projection bias, temperature, SimSiam heads (their biases
    folded into batch norm) and the MLM head all compute what the released
    layout's reference computes, in inference."""
    released, reference = released_declip_state()
    path = tmp_path / "declip_vitb32.pth.tar"
    torch.save({"state_dict": released}, path)
    model = import_checkpoint(path, queue_size=64)
    assert model.text_encoder.vocabulary_size == TOKENS + 1
    assert model.simsiam_projection_dim == 48 and model.simsiam_prediction_dim == 16

    rng = np.random.default_rng(2)
    images = rng.standard_normal((4, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = captions(rng, 4, tokens=TOKENS + 1)  # DeCLIP's ids: end is the largest
    positions = np.stack([rng.permutation(CONTEXT)[:3] for _ in range(4)])
    batch = {
        "image_1": images, "image_2": images[::-1].copy(), "token_ids": ids,
        "mask_positions": positions.astype(np.int32),
        "mask_ids": np.ones((4, 3), np.int32),
        "mask_weights": np.ones((4, 3), np.float32),
    }  # fmt: skip
    outputs = model(batch, training=False)
    np.testing.assert_allclose(
        to_numpy(outputs["image_embeddings"])[:, 0],
        reference_image(images, reference),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        to_numpy(outputs["text_embeddings"])[:, 0],
        reference_text(ids, reference),
        atol=1e-4,
    )
    features = torch.from_numpy(reference_image(images, reference, normalize=False))
    z, p = reference_heads(features, reference)
    projections = to_numpy(outputs["simsiam_projections"])[:, 0]
    np.testing.assert_allclose(projections, z, atol=1e-4)
    np.testing.assert_allclose(
        to_numpy(outputs["simsiam_predictions"])[:, 0], p, atol=1e-4
    )
    sequence = torch.from_numpy(reference_text(ids, reference, sequence=True))
    masked = sequence[torch.arange(4)[:, None], torch.from_numpy(positions)]
    logits = F.linear(
        masked,
        reference["text_label_predictor.weight"],
        reference["text_label_predictor.bias"],
    )
    np.testing.assert_allclose(
        to_numpy(outputs["mlm_logits"]), logits.numpy(), atol=1e-4
    )
    assert float(to_numpy(model.logit_scale)) == pytest.approx(4.2)


def random_openai_resnet_state(width=8, depths=(1, 2, 1, 1), image=64, seed=3):
    """Random tensors under OpenAI's modified-ResNet CLIP keys, with the
    small ViT test state's text tower."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {k: v for k, v in random_openai_state(seed).items() if "visual" not in k}

    def conv_bn(conv, bn, out, into, kernel):
        state[f"{conv}.weight"] = rand(out, into, kernel, kernel)
        state[f"{bn}.weight"] = 1 + rand(out, scale=0.05)
        state[f"{bn}.bias"] = rand(out, scale=0.05)
        state[f"{bn}.running_mean"] = rand(out, scale=0.05)
        state[f"{bn}.running_var"] = 1 + rand(out, scale=0.05).abs()

    conv_bn("visual.conv1", "visual.bn1", width // 2, 3, 3)
    conv_bn("visual.conv2", "visual.bn2", width // 2, width // 2, 3)
    conv_bn("visual.conv3", "visual.bn3", width, width // 2, 3)
    channels = width
    for stage, depth in enumerate(depths):
        planes = width * 2**stage
        for block in range(depth):
            b = f"visual.layer{stage + 1}.{block}"
            conv_bn(f"{b}.conv1", f"{b}.bn1", planes, channels, 1)
            conv_bn(f"{b}.conv2", f"{b}.bn2", planes, planes, 3)
            conv_bn(f"{b}.conv3", f"{b}.bn3", planes * 4, planes, 1)
            if block == 0:
                conv_bn(
                    f"{b}.downsample.0", f"{b}.downsample.1", planes * 4, channels, 1
                )
            channels = planes * 4
    grid = image // 32
    state["visual.attnpool.positional_embedding"] = rand(grid * grid + 1, channels)
    for name in ("q_proj", "k_proj", "v_proj"):
        state[f"visual.attnpool.{name}.weight"] = rand(channels, channels, scale=0.05)
        state[f"visual.attnpool.{name}.bias"] = rand(channels, scale=0.05)
    state["visual.attnpool.c_proj.weight"] = rand(EMBED, channels, scale=0.05)
    state["visual.attnpool.c_proj.bias"] = rand(EMBED, scale=0.05)
    return state


def reference_resnet_image(images: np.ndarray, s, heads: int) -> np.ndarray:
    """OpenAI's ModifiedResNet: a 3-conv stem, anti-aliased bottlenecks
    (average pooling before the strided block's last conv and in its
    shortcut), attention pooling with the mean token as the query."""

    def conv_bn(x, conv, bn, stride=1):
        weight = s[f"{conv}.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)
        return F.batch_norm(
            x, s[f"{bn}.running_mean"], s[f"{bn}.running_var"],
            s[f"{bn}.weight"], s[f"{bn}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = F.relu(conv_bn(x, "visual.conv1", "visual.bn1", stride=2))
    x = F.relu(conv_bn(x, "visual.conv2", "visual.bn2"))
    x = F.relu(conv_bn(x, "visual.conv3", "visual.bn3"))
    x = F.avg_pool2d(x, 2)
    for stage in (1, 2, 3, 4):
        block = 0
        while f"visual.layer{stage}.{block}.conv1.weight" in s:
            b, stride = (
                f"visual.layer{stage}.{block}",
                2 if stage > 1 and block == 0 else 1,
            )
            out = F.relu(conv_bn(x, f"{b}.conv1", f"{b}.bn1"))
            out = F.relu(conv_bn(out, f"{b}.conv2", f"{b}.bn2"))
            out = F.avg_pool2d(out, stride) if stride > 1 else out
            out = conv_bn(out, f"{b}.conv3", f"{b}.bn3")
            if f"{b}.downsample.0.weight" in s:
                shortcut = F.avg_pool2d(x, stride) if stride > 1 else x
                x = conv_bn(shortcut, f"{b}.downsample.0", f"{b}.downsample.1")
            x = F.relu(out + x)
            block += 1
    p = "visual.attnpool"
    x = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
    x = (
        torch.cat([x.mean(0, keepdim=True), x])
        + s[f"{p}.positional_embedding"][:, None]
    )
    biases = torch.cat([s[f"{p}.{n}_proj.bias"] for n in "qkv"])
    x, _ = F.multi_head_attention_forward(
        x[:1], x, x, x.shape[-1], heads, None, biases, None, None, False, 0.0,
        s[f"{p}.c_proj.weight"], s[f"{p}.c_proj.bias"], training=False,
        need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=s[f"{p}.q_proj.weight"], k_proj_weight=s[f"{p}.k_proj.weight"],
        v_proj_weight=s[f"{p}.v_proj.weight"],
    )  # fmt: skip
    return F.normalize(x[0], dim=-1).numpy()


def test_an_openai_resnet_checkpoint_computes_the_reference_embeddings(tmp_path):
    state = random_openai_resnet_state()
    path = tmp_path / "RN50-like.pt"
    torch.save(state, path)
    model = import_checkpoint(path, queue_size=64)
    assert model.image_encoder.stage_depths == (1, 2, 1, 1)
    images = np.random.default_rng(3).standard_normal((3, 64, 64, 3)).astype(np.float32)
    expected = reference_resnet_image(images, state, heads=8 * 32 // 64)
    np.testing.assert_allclose(
        to_numpy(model.encode_image(images)), expected, atol=1e-4
    )
