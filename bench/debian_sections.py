"""The Debian-sections data set (DESIGN.md §7): package descriptions labelled by archive section.

Each record holds the whole description (`text`: synopsis + long description) and the synopsis alone
(`synopsis`, a few words: the short-text set of bench/precision.py).

Built from one private `apt-get update` (the machine's own apt state is untouched), never committed:
`python -m bench.debian_sections --out bench/data/debian-sections` writes train/dev/test JSONL files
that `switchboard train` reads. Splits are by *source* package, because binary packages built from
one source share most of their text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from debian.deb822 import Deb822

TOPICAL = ("net", "science", "admin", "games", "text", "sound", "graphics", "fonts", "web", "math", "mail",
           "editors", "database", "video", "electronics", "httpd", "hamradio", "vcs")


def fetch_lists(workdir: Path) -> tuple[str, str]:
    """(dumpavail, Translation-en) texts from a private apt update into `workdir`."""
    lists, cache = workdir / "lists", workdir / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    dirs = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]
    subprocess.run(["apt-get", "update", "-qq", "-o", "Acquire::Languages=en", *dirs], check=True)
    dumpavail = subprocess.run(["apt-cache", *dirs, "dumpavail"], check=True, capture_output=True, text=True).stdout
    translations = sorted(str(p) for p in lists.glob("*Translation-en*"))
    if not translations:
        raise RuntimeError("apt update fetched no Translation-en file")
    translation = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", *translations], check=True,
                                 capture_output=True, text=True).stdout
    return dumpavail, translation


def _clean(description: str) -> str:
    lines = [line.strip() for line in description.splitlines()]
    return re.sub(r"\s+", " ", " ".join(line for line in lines if line != ".")).strip()


def join_records(dumpavail: str, translation: str) -> list[dict]:
    """One record per binary package: text (short + long description), label (section), source."""
    texts = {p["Description-md5"]: (_clean(p["Description-en"]), _clean(p["Description-en"].split("\n", 1)[0]))
             for p in Deb822.iter_paragraphs(translation.splitlines())
             if "Description-md5" in p and "Description-en" in p}
    records: dict[str, dict] = {}
    for p in Deb822.iter_paragraphs(dumpavail.splitlines()):
        text, synopsis = texts.get(p.get("Description-md5", ""), ("", ""))
        if not text or "Section" not in p or p["Package"] in records:
            continue
        section = p["Section"].split("/")[-1]  # contrib/net, non-free/net → net
        source = p.get("Source", p["Package"]).split()[0]
        records[p["Package"]] = {"text": text, "synopsis": synopsis, "label": section, "source": source,
                                 "package": p["Package"]}
    return list(records.values())


def split_of(source: str, test: float, dev: float) -> str:
    """Stable split by source package name (a hash, so it never depends on the order of the lists)."""
    u = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test else "dev" if u < test + dev else "train"


def build(records: list[dict], classes: tuple[str, ...] = TOPICAL, cap: int = 400, test: float = 0.2,
          dev: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """Topical subset, at most `cap` packages per class (sampled), split by source package."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["package"]):
        if r["label"] in classes:
            by_class[r["label"]].append(r)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for label in classes:
        members = by_class[label]
        rng.shuffle(members)
        for r in members[:cap]:
            splits[split_of(r["source"], test, dev)].append(r)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def load(out: Path) -> dict[str, list[dict]]:
    """The splits written by `main`, building them first if they are missing."""
    if not all((out / f"{name}.jsonl").exists() for name in ("train", "dev", "test")):
        write(out)
    return {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "dev", "test")}


def write(out: Path, cap: int = 400) -> dict[str, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        records = join_records(*fetch_lists(Path(tmp)))
    return save_splits(out, build(records, cap=cap), len(records))


def save_splits(out: Path, splits: dict[str, list[dict]], packages: int) -> dict[str, list[dict]]:
    """train/dev/test JSONL files and stats.json (label counts per split) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"text": r["text"], "synopsis": r["synopsis"], "label": r["label"],
                                    "source": r["source"]}) + "\n")
    counts = {name: Counter(r["label"] for r in rows) for name, rows in splits.items()}
    (out / "stats.json").write_text(json.dumps({"packages": packages, "counts": counts}, indent=1))
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/data/debian-sections"))
    parser.add_argument("--cap", type=int, default=400, help="packages per class")
    args = parser.parse_args()
    splits = write(args.out, args.cap)
    print({name: len(rows) for name, rows in splits.items()}, "→", args.out)


if __name__ == "__main__":
    main()
