"""Time and size of each squashfs compressor on a benchmark image's final tree.

    .venv/bin/python bench/compressors.py [--size medium] [--workdir .state/bench]

Uses the layer files `bench/run` built; flattens them with imagegw's own flattener into one
tar in the page cache, then builds the squashfs from it with every compressor, as imagegw's
squash stage does (tar2sqfs, both cores). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.images import IMAGES  # noqa: E402
from imagegw.build.flatten import LayerSource, flatten_layers  # noqa: E402
from imagegw.build.squash import build_squashfs  # noqa: E402
from imagegw.config import Compression  # noqa: E402

CANDIDATES = ("gzip:1", "gzip:6", "gzip:9", "xz:6", "lz4", "zstd:1", "zstd:3", "zstd:9", "zstd:15")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=sorted(IMAGES))
    parser.add_argument("--workdir", default=".state/bench", type=Path)
    parser.add_argument("--compressors", default=",".join(CANDIDATES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compressors-") as scratch:
        tree = flatten_layers(_unpacked_layers(args.workdir / "layers", args.size, Path(scratch)))
        print(f"{args.size}: {tree.entries} entries, {tree.file_bytes / 1e6:.0f} MB of file data\n")
        print("| compressor | build | image size | ratio |")
        print("|---|---|---|---|")
        for text in args.compressors.split(","):
            algorithm, _, level = text.partition(":")
            output = Path(scratch) / "image.squashfs"
            started = time.monotonic()
            result = build_squashfs(tree, output, Compression(algorithm, int(level) if level else None))
            elapsed = time.monotonic() - started
            print(f"| {text} | {elapsed:.1f} s | {result.size / 1e6:.0f} MB | "
                  f"{tree.file_bytes / result.size:.2f} |", flush=True)
            output.unlink()


def _unpacked_layers(layer_dir: Path, size: str, scratch: Path) -> list[LayerSource]:
    sources = []
    for spec in IMAGES[size].layers:
        packed = layer_dir / f"{spec.name}.tar.gz"
        if not packed.is_file():
            sys.exit(f"{packed} is missing: run bench/run --sizes {size} first")
        target = scratch / f"{spec.name}.tar"
        with gzip.open(packed, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        sources.append(LayerSource(target, spec.name))
    return sources


if __name__ == "__main__":
    main()
