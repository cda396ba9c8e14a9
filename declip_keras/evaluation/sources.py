"""Where evaluation data and class names come from.

- Class names and CLIP's per-dataset prompt templates for ImageNet-1k and the
  downstream sets (shipped in `assets/classnames.json`).
- ImageFolder directories (`root/<class>/<image>`) for zero-shot and probes.
- Karpathy-style JSON (COCO / Flickr30k splits) for retrieval.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from pathlib import Path

from declip_keras.data.image_constants import EVAL_IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class EvaluationTargets:
    """What to evaluate, on which data: the options `declip-keras eval` and
    `train` share, and `declip_keras.evaluation.metrics.evaluate`'s arguments.

    Args:
        zero_shot: labelled shards or an ImageFolder directory.
        classnames: a dataset's name, names separated by commas, or a JSON
            file of names.
        templates: prompt templates (`resolve_templates`' input).
        retrieval: caption shards or a Karpathy JSON file.
        probe: (train, test) sources as for `zero_shot`.

    Example:
    >>> targets = EvaluationTargets(zero_shot="eval/", probe=["a/", "b/"])
    >>> targets.sources
    {'zero_shot': 'eval/', 'linear_probe': ('a/', 'b/')}
    """

    zero_shot: str | None = None
    classnames: str | None = None
    templates: str | None = None
    retrieval: str | None = None
    probe: tuple[str, str] | None = None

    def __post_init__(self):
        if self.probe is not None:
            if len(self.probe) != 2:
                raise ValueError(f"probe takes TRAIN and TEST, got {self.probe!r}.")
            object.__setattr__(self, "probe", tuple(self.probe))

    @property
    def sources(self) -> dict[str, str | tuple[str, str]]:
        """The data of each evaluation asked for, by its name in `evaluate`'s
        results (`zero_shot`, `retrieval`, `linear_probe`)."""
        sources = {
            "zero_shot": self.zero_shot,
            "retrieval": self.retrieval,
            "linear_probe": self.probe,
        }
        return {task: source for task, source in sources.items() if source}

    @property
    def paths(self) -> list[str]:
        """Every file, folder or glob the evaluations read."""
        return [
            path
            for source in self.sources.values()
            for path in (source if isinstance(source, tuple) else (source,))
        ]


# The option names of the evaluation targets (`declip-keras eval` and `train`).
EVAL_TARGETS = tuple(field.name for field in dataclasses.fields(EvaluationTargets))


@functools.cache
def _metadata() -> dict:
    text = (
        resources.files("declip_keras").joinpath("assets/classnames.json").read_text()
    )
    return json.loads(text)


def dataset_names() -> list[str]:
    """The datasets with shipped class names (`imagenet1k`, `cifar10`, ...)."""
    return list(_metadata()["classnames"])


def dataset_classnames(dataset: str) -> list[str]:
    """Class names of a known dataset, in its label order.

    Example:
    >>> dataset_classnames("cifar10")[:3]
    ['airplane', 'automobile', 'bird']
    """
    names = _metadata()["classnames"]
    if dataset not in names:
        raise KeyError(f"No class names for {dataset!r}; known: {', '.join(names)}.")
    return list(names[dataset])


def dataset_templates(dataset: str) -> tuple[str, ...]:
    """CLIP's prompt templates for a known dataset (`{}` marks the class name)."""
    templates = _metadata()["templates"]
    if dataset not in templates:
        raise KeyError(f"No templates for {dataset!r}; known: {', '.join(templates)}.")
    # CLIP writes them with `{c}`; `str.format` here takes a positional `{}`.
    return tuple(t.replace("{c}", "{}") for t in templates[dataset])


def read_image_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """`root/<class>/<image>` -> image paths, labels, class folder names.

    Classes are the sub-folders in sorted order (torchvision's convention);
    files without an image suffix are ignored.
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{root} has no class sub-folders (root/<class>/img).")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in EVAL_IMAGE_SUFFIXES:
                paths.append(str(path))
                labels.append(label)
    if not paths:
        raise FileNotFoundError(
            f"No images ({', '.join(EVAL_IMAGE_SUFFIXES)}) under {root}."
        )
    return paths, labels, [f.name for f in folders]


def read_karpathy(
    json_path: str | Path, image_root: str | Path | None = None, split: str = "test"
) -> tuple[list[str], list[str], list[int]]:
    """Karpathy-split JSON (COCO, Flickr30k) -> image paths, captions, owners.

    Each entry of `images` with the wanted `split` gives one image at
    `image_root/[filepath/]filename` (default root: the JSON's folder) and
    its `sentences[*].raw` captions; `owners[j]` is caption j's image index.
    """
    json_path = Path(json_path)
    entries = json.loads(json_path.read_text()).get("images")
    if not isinstance(entries, list):
        raise ValueError(
            f"{json_path}: expected a Karpathy JSON with an `images` list."
        )
    root = Path(image_root) if image_root else json_path.parent
    paths, captions, owners = [], [], []
    for number, entry in enumerate(entries):
        if entry.get("split") != split:
            continue
        try:
            path = root / entry.get("filepath", "") / entry["filename"]
            sentences = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{json_path}: images[{number}] lacks field {error}."
            ) from None
        owners += [len(paths)] * len(sentences)
        captions += sentences
        paths.append(str(path))
    if not paths:
        raise ValueError(f"{json_path}: no image in split {split!r}.")
    return paths, captions, owners
