"""Builds declip_keras/assets/classnames.json: zero-shot class names and prompts.

Sources (no network; run it only to regenerate the shipped file):
- clip-benchmark 1.6.2 (MIT): CLIP's curated English class names for ImageNet-1k,
  Oxford Pets, Flowers-102 and Caltech-101, and CLIP's per-dataset templates.
- tensorflow-datasets 4.9.10 (Apache-2.0): label lists of Food-101, SUN397,
  DTD and Stanford Cars, tidied here (underscores to spaces, SUN397's
  `/a/abbey`-style paths to "abbey" or "apartment building (outdoor)").
- CIFAR-10 and CIFAR-100 label names and FGVC-Aircraft's 100 variant names,
  the datasets' own (written out below).

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

# FGVC-Aircraft's variants.txt, in its order.
AIRCRAFT = (
    "707-320|727-200|737-200|737-300|737-400|737-500|737-600|737-700|737-800|"
    "737-900|747-100|747-200|747-300|747-400|757-200|757-300|767-200|767-300|"
    "767-400|777-200|777-300|A300B4|A310|A318|A319|A320|A321|A330-200|A330-300|"
    "A340-200|A340-300|A340-500|A340-600|A380|ATR-42|ATR-72|An-12|BAE 146-200|"
    "BAE 146-300|BAE-125|Beechcraft 1900|Boeing 717|C-130|C-47|CRJ-200|CRJ-700|"
    "CRJ-900|Cessna 172|Cessna 208|Cessna 525|Cessna 560|Challenger 600|DC-10|"
    "DC-3|DC-6|DC-8|DC-9-30|DH-82|DHC-1|DHC-6|DHC-8-100|DHC-8-300|DR-400|"
    "Dornier 328|E-170|E-190|E-195|EMB-120|ERJ 135|ERJ 145|Embraer Legacy 600|"
    "Eurofighter Typhoon|F-16A/B|F/A-18|Falcon 2000|Falcon 900|Fokker 100|"
    "Fokker 50|Fokker 70|Global Express|Gulfstream IV|Gulfstream V|Hawk T1|Il-76|"
    "L-1011|MD-11|MD-80|MD-87|MD-90|Metroliner|Model B200|PA-28|SR-20|Saab 2000|"
    "Saab 340|Spitfire|Tornado|Tu-134|Tu-154|Yak-42"
).split("|")
# Our dataset names where clip-benchmark's differ.
TEMPLATE_KEYS = {"aircraft": "fgvc_aircraft"}

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
    "aircraft": 100,
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
        "aircraft": AIRCRAFT,
    }
    for dataset, size in EXPECTED_SIZES.items():
        if len(classnames[dataset]) != size:
            raise ValueError(f"{dataset}: {len(classnames[dataset])} names, not {size}")
    return {
        "classnames": classnames,
        "templates": {d: templates[TEMPLATE_KEYS.get(d, d)] for d in classnames},
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
