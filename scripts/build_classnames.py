"""Builds declip_keras/assets/classnames.json: zero-shot class names and prompts.

Sources (no network; run it only to regenerate the shipped file):
- clip-benchmark 1.6.2 (MIT): CLIP's curated English class names for ImageNet-1k,
  Oxford Pets, Flowers-102 and Caltech-101, and CLIP's per-dataset templates.
- tensorflow-datasets 4.9.10 (Apache-2.0): label lists of Food-101, SUN397,
  DTD and Stanford Cars, tidied here (underscores to spaces, SUN397's
  `/a/abbey`-style paths to "abbey" or "apartment building (outdoor)").
- CIFAR-10 and CIFAR-100 label names, the datasets' own (written out below).

    pip download --no-deps clip-benchmark==1.6.2 tensorflow-datasets==4.9.10
    python scripts/build_classnames.py clip_benchmark-*.whl tensorflow_datasets-*.whl
"""

from __future__ import annotations

import argparse
import ast
import json
import zipfile
from pathlib import Path

OUTPUT = Path(__file__).parents[1] / "declip_keras" / "assets" / "classnames.json"

CIFAR10 = (
    "airplane automobile bird cat deer dog frog horse ship truck"
).split()  # fmt: skip
CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy "
    "bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee "
    "clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()  # fmt: skip

EXPECTED_SIZES = {
    "imagenet1k": 1000,
    "cifar10": 10,
    "cifar100": 100,
    "food101": 101,
    "pets": 37,
    "flowers": 102,
    "caltech101": 102,
    "sun397": 397,
    "cars": 196,
    "dtd": 47,
}
TFDS = "tensorflow_datasets/image_classification/"


def _tidy(name: str) -> str:
    return name.replace("_", " ").strip()


def _sun397(path: str) -> str:
    # "/a/apartment_building/outdoor" -> "apartment building (outdoor)"
    parts = path.strip("/").split("/")[1:]
    name = _tidy(parts[0])
    return f"{name} ({_tidy(parts[1])})" if len(parts) > 1 else name


def _lines(archive: zipfile.ZipFile, name: str) -> list[str]:
    return [line for line in archive.read(name).decode().splitlines() if line.strip()]


def _python_list(source: str, variable: str) -> list[str]:
    """The literal list assigned to `variable` in a Python source file."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == variable for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"no {variable} in the source")


def build(clip_benchmark: Path, tfds: Path) -> dict:
    with zipfile.ZipFile(clip_benchmark) as archive:
        names = json.loads(archive.read("clip_benchmark/datasets/en_classnames.json"))
        templates = json.loads(
            archive.read(
                "clip_benchmark/datasets/en_zeroshot_classification_templates.json"
            )
        )
    with zipfile.ZipFile(tfds) as archive:
        tfds_names = {
            "food101": list(map(_tidy, _lines(archive, TFDS + "food-101_classes.txt"))),
            "sun397": list(map(_sun397, _lines(archive, TFDS + "sun397_labels.txt"))),
            "dtd": _lines(archive, TFDS + "dtd_key_attributes.txt"),
            "cars": _python_list(archive.read(TFDS + "cars196.py").decode(), "_NAMES"),
        }
    classnames = {
        "imagenet1k": names["imagenet1k"],
        "cifar10": CIFAR10,
        "cifar100": [_tidy(n) for n in CIFAR100],
        **tfds_names,
        "pets": names["pets"],
        "flowers": names["flowers"],
        "caltech101": names["caltech101"],
    }
    for dataset, size in EXPECTED_SIZES.items():
        if len(classnames[dataset]) != size:
            raise ValueError(f"{dataset}: {len(classnames[dataset])} names, not {size}")
    return {
        "classnames": classnames,
        "templates": {d: templates[d] for d in classnames if d in templates},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip_benchmark_wheel", type=Path)
    parser.add_argument("tfds_wheel", type=Path)
    args = parser.parse_args()
    data = build(args.clip_benchmark_wheel, args.tfds_wheel)
    OUTPUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print({d: len(n) for d, n in data["classnames"].items()}, "->", OUTPUT)


if __name__ == "__main__":
    main()
