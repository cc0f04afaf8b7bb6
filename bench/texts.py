"""Real text for benchmarks, read from this machine: Debian package descriptions (dpkg's database).

Nobody here wrote them, they need no network, and they look like the Debian-sections data set that
the accuracy work uses (DESIGN.md §7).
"""

from __future__ import annotations

import random
import re
import subprocess


def debian_descriptions(synopsis_only: bool = False) -> list[str]:
    """Every installed package's description (synopsis + long text), or its synopsis alone (a few words:
    the short-text set)."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Description}\n\x1e"], capture_output=True, text=True,
                         check=True).stdout
    texts = []
    for block in out.split("\x1e"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if synopsis_only:
            lines = lines[:1]
        text = re.sub(r"\s+", " ", " ".join(line for line in lines if line != ".")).strip()
        if text:
            texts.append(text)
    return texts


def sample_texts(n: int, seed: int = 0, short: bool = False) -> list[str]:
    texts = debian_descriptions(synopsis_only=short)
    if not texts:
        raise RuntimeError("no Debian package descriptions found (dpkg-query returned nothing)")
    rng = random.Random(seed)
    return [rng.choice(texts) for _ in range(n)]
