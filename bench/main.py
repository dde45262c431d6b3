"""``bench/run``: skopeo+umoci+mksquashfs against ``imagegw pull``, on realistic images, in one session.

For each size: alternating rounds of (a) and (b) (cold cache, then warm), a re-pull of the
unchanged tag, a pull of a sibling image that shares all but its top layer, the equality check
of the two outputs and the physical floor. Prints the table and writes ``<workdir>/results.md``
(and ``results.json`` with every run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.compare import Comparison, compare_squashfs  # noqa: E402 (after the sys.path line)
from bench.images import SIZES, BuiltImage, build_and_push, log  # noqa: E402
from bench.link import bits_per_second, loopback_limited  # noqa: E402
from bench.pipelines import (  # noqa: E402
    Compressor,
    Database,
    Floor,
    Gateway,
    PrefectServer,
    RunResult,
    measure_floor,
    page_in,
    remove,
    run_api_repull,
    run_imagegw,
    run_skopeo_umoci,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help="comma-separated image sizes: small, medium, large (default: all)")
    parser.add_argument("--compression", default="zstd:3",
                        help="squashfs compressor of both pipelines, as imagegw's Compression (default: zstd:3)")
    parser.add_argument("--repeat", type=int, default=2, help="alternating rounds per pipeline (default: 2)")
    parser.add_argument("--workdir", default=str(ROOT / ".state" / "bench"),
                        help="built layers, the registry's storage and the runs (default: .state/bench)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directories (outputs, caches)")
    parser.add_argument("--bandwidth", metavar="RATE",
                        help="limit loopback traffic (the registry's downloads) to RATE while the pipelines run, "
                             "as tc writes it: 500mbit, 1gbit (needs root)")
    args = parser.parse_args(argv)
    if args.bandwidth is not None:
        try:
            bits_per_second(args.bandwidth)
        except ValueError as exc:
            parser.error(str(exc))
    args.sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]
    unknown = [size for size in args.sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}: choose from {', '.join(SIZES)}")
    try:
        args.compressor = Compressor.parse(args.compression)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


class Session:
    """The registry, database and Prefect server shared by every run."""

    def __init__(self, workdir: Path) -> None:
        from testsupport.registry import RunningRegistry

        self.workdir = workdir
        self.registry = RunningRegistry.start(workdir / "registry")
        log(f"registry on {self.registry.url}, storage {self.registry.storage}")
        self.database: Database | None = None
        self.prefect: PrefectServer | None = None

    def start_services(self) -> None:
        self.database = Database(self.workdir / "gateway-state")
        self.prefect = PrefectServer(self.workdir / "prefect-home")

    def stop(self) -> None:
        for stop in (self.prefect and self.prefect.stop, self.database and self.database.stop, self.registry.stop):
            if stop:
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - stop the others anyway
                    log(f"while stopping: {exc}")


def bench_size(session: Session, size: str, image: BuiltImage, sibling: BuiltImage, args: argparse.Namespace,
               runs_dir: Path) -> dict[str, Any]:
    assert session.prefect is not None and session.database is not None
    registry = session.registry
    blobs = [registry.blob_path(layer.digest) for layer in image.layers]
    page_in(blobs)  # every pipeline reads the registry's blobs from memory, the first one too
    results: list[RunResult] = []
    comparison: Comparison | None = None
    floor: Floor | None = None
    first_outputs: dict[str, Path] = {}

    def gateway(run_dir: Path, database: str, cache: Path, images: Path) -> Gateway:
        assert session.database is not None
        return Gateway(run_dir, registry.url, registry.host, session.database.uri, database, args.compressor,
                       session.workdir / "gateway-state", cache, images).write()

    def pipeline_a(round_: int) -> None:
        run_dir = runs_dir / f"{size}-a-{round_}"
        remove(run_dir)
        log(f"{size} round {round_ + 1}: (a) skopeo copy + umoci unpack + mksquashfs")
        result = run_skopeo_umoci(image, registry.host, args.compressor, run_dir)
        log(f"  (a) {result.wall:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.steps.items()))
        results.append(result)
        remove(run_dir / "oci")
        remove(run_dir / "bundle")
        if round_ == 0:
            first_outputs["a"] = result.output  # type: ignore[assignment]
        elif not args.keep:
            remove(run_dir)

    def pipeline_b(round_: int) -> None:
        run_dir = runs_dir / f"{size}-b-{round_}"
        remove(run_dir)
        cache = run_dir / "cache"
        database = f"bench_{size}_{round_}_{os.getpid()}"
        cold = gateway(run_dir, database + "_cold", cache, run_dir / "images-cold")
        log(f"{size} round {round_ + 1}: (b) imagegw pull, cold cache")
        result = run_imagegw("b-cold", image, cold, session.prefect, session.database, registry.log_path)
        log(f"  (b) cold {result.wall:.1f} s, {result.blob_gets} blob GETs: {_stages(result)}")
        results.append(result)
        # warm: the layer cache kept, a new image directory and index database, so it converts again
        warm = gateway(run_dir, database + "_warm", cache, run_dir / "images-warm")
        result = run_imagegw("b-warm", image, warm, session.prefect, session.database, registry.log_path)
        log(f"  (b) warm {result.wall:.1f} s, {result.blob_gets} blob GETs: {_stages(result)}")
        results.append(result)
        if round_ == 0:
            first_outputs["b"] = results[-2].output  # type: ignore[assignment]
            # a re-pull of the unchanged tag, everything kept: no download, no conversion
            result = run_imagegw("b-repull", image, warm, session.prefect, session.database, registry.log_path)
            log(f"  (b) re-pull unchanged {result.wall:.2f} s, {result.blob_gets} blob GETs: {_stages(result)}")
            results.append(result)
            result = run_api_repull(image, warm, registry.log_path)
            log(f"  (b) re-pull through the REST API, in process: {result.steps['first request'] * 1000:.0f} ms "
                f"first, {result.wall * 1000:.1f} ms median, {result.blob_gets} blob GETs")
            results.append(result)
            # a second image that shares all but its top layer with the one just pulled
            shared = {layer.digest for layer in sibling.layers} & {layer.digest for layer in image.layers}
            result = run_imagegw("b-sibling", sibling, warm, session.prefect, session.database,
                                 registry.log_path, layer_digests=shared)
            log(f"  (b) sibling sharing {len(shared)} layers {result.wall:.1f} s, {result.blob_gets} blob GETs, "
                f"{result.shared_blob_gets} of shared layers")
            results.append(result)
        session.database.drop(database + "_cold")
        session.database.drop(database + "_warm")
        remove(run_dir / "images-warm")
        remove(cache)
        if round_ != 0 and not args.keep:
            remove(run_dir)

    for round_ in range(args.repeat):
        order = (pipeline_a, pipeline_b) if round_ % 2 == 0 else (pipeline_b, pipeline_a)
        for step in order:
            with loopback_limited(args.bandwidth):
                step(round_)
        if round_ == 0:
            log(f"{size}: checking that (a) and (b) hold the same tree")
            comparison = compare_squashfs(first_outputs["a"], first_outputs["b"])
            log(f"  {comparison.verdict()}")
            for line in comparison.differences:
                log(f"    {line}")
            log(f"{size}: physical floor")
            floor = measure_floor(blobs, first_outputs["b"], args.compressor, runs_dir / f"{size}-floor")
            if args.bandwidth:
                floor.download = sum(blob.stat().st_size for blob in blobs) * 8 / bits_per_second(args.bandwidth)
            log(f"  decompress {floor.decompress_serial:.1f} s serial, {floor.decompress_parallel:.1f} s "
                f"{os.cpu_count()}-way; compress the tree ({floor.tree_tar_bytes / 1e6:.0f} MB) "
                f"{floor.compress:.1f} s")
            if not args.keep:
                remove(runs_dir / f"{size}-a-0")
                remove(runs_dir / f"{size}-b-0")
                remove(runs_dir / f"{size}-floor")
    assert comparison is not None and floor is not None
    return {"size": size, "image": image.reference(registry.host), "layers": len(image.layers),
            "blob_bytes": image.blob_bytes, "tar_bytes": image.tar_bytes,
            "runs": [run.to_json() for run in results], "floor": floor.to_json(),
            "comparison": {**comparison.__dict__, "verdict": comparison.verdict()}}


def _stages(result: RunResult) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.steps.items())


# --------------------------------------------------------------------------- the report


def _median(runs: list[dict[str, Any]], pipeline: str, key: str) -> float | None:
    values = [run[key] for run in runs if run["pipeline"] == pipeline and run[key] is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, unit: str = "s", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f} {unit}".strip()


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.0f} MB"


def report(sizes: list[dict[str, Any]], args: argparse.Namespace) -> str:
    link = f", registry behind a {args.bandwidth} link" if args.bandwidth else ""
    title = (f"# imagegw pull benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"compression {args.compressor}{link}, median of {args.repeat} alternating runs)")
    legend = (
        "(a) = `skopeo copy` + `umoci unpack --rootless` + `mksquashfs`; (b) = `imagegw pull` to READY "
        "(a new process: Python start-up and Prefect included). CPU is user+system of the command's process "
        "tree; (b)'s also lists, after '+', what the Prefect server and SecantusDB spent meanwhile. Peak RSS "
        "is the largest sum of RSS over the command's process tree (sampled every 50 ms). Floor = max("
        "decompressing the layer blobs with ISA-L (`python -m isal.igzip -d`), two at a time; "
        "`tar2sqfs -j 2` of the final tree "
        "from a tar in memory" + ("; downloading the blobs at the link's rate" if args.bandwidth else "") + "). "
        f"Floor, cores shared = the same, or the CPU-seconds of both over the {os.cpu_count()} cores if more: "
        "what decompressing and compressing take at the least when one pull must do both on this machine."
    )
    lines = [
        title,
        "",
        legend,
        "",
        "| image | pipeline | wall | CPU | peak RSS | output | b/a wall | floor | ÷ floor | floor, cores shared "
        "| ÷ it | blob GETs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sizes:
        runs, floor, shared_floor = entry["runs"], entry["floor"]["floor"], entry["floor"]["shared_cores"]
        wall_a = _median(runs, "a", "wall")
        label = (f"{entry['size']} ({entry['layers']} layers, {entry['blob_bytes'] / 1e6:.0f} MB gz, "
                 f"tree {entry['floor']['tree_tar_bytes'] / 1e6:.0f} MB)")
        for pipeline, name in (("a", "(a) skopeo+umoci+mksquashfs"), ("b-cold", "(b) imagegw, cold cache"),
                               ("b-warm", "(b) imagegw, layers cached"), ("b-repull", "(b) re-pull, unchanged"),
                               ("b-api-repull", "(b) re-pull via REST API (in process)"),
                               ("b-sibling", "(b) sibling, shared layers")):
            wall = _median(runs, pipeline, "wall")
            if wall is None:
                continue
            cpu = _median(runs, pipeline, "cpu")
            server = _median(runs, pipeline, "server_cpu") if pipeline != "a" else None
            gets = _median(runs, pipeline, "blob_gets")
            layer_gets = _median(runs, pipeline, "layer_gets")
            shared = _median(runs, pipeline, "shared_blob_gets")
            gets_text = "–" if gets is None or layer_gets is None else (
                f"{layer_gets:.0f} layers + {gets - layer_gets:.0f} config"
                + (f" ({shared:.0f} of shared layers)" if shared is not None else ""))
            ratio = f"{wall / wall_a:.2f}×" if wall_a and pipeline in ("b-cold", "b-warm") else ""
            cpu_text = _fmt(cpu) + (f" + {server:.1f}" if server is not None else "")
            output = _median(runs, pipeline, "output_size")
            if pipeline == "b-api-repull":  # a request inside a running process: no CPU or output of its own
                cpu_text, output = "–", None
            wall_text = f"{wall * 1000:.1f} ms" if wall < 0.1 else _fmt(wall, digits=2 if wall < 10 else 1)
            lines.append(f"| {label} | {name} | {wall_text} | {cpu_text} | "
                         f"{_mb(_median(runs, pipeline, 'peak_rss'))} | {_mb(output)} "
                         f"| {ratio} | {_fmt(floor) if pipeline in ('a', 'b-cold') else ''} | "
                         f"{f'{wall / floor:.2f}×' if pipeline in ('a', 'b-cold', 'b-warm') else ''} | "
                         f"{_fmt(shared_floor) if pipeline in ('a', 'b-cold') else ''} | "
                         f"{f'{wall / shared_floor:.2f}×' if pipeline in ('a', 'b-cold', 'b-warm') else ''} | "
                         f"{gets_text} |")
            label = ""
    lines += ["", "Steps (median seconds):", ""]
    for entry in sizes:
        for pipeline in ("a", "b-cold", "b-warm", "b-repull", "b-api-repull", "b-sibling"):
            steps: dict[str, list[float]] = {}
            for run in entry["runs"]:
                if run["pipeline"] == pipeline:
                    for name, seconds in run["steps"].items():
                        steps.setdefault(name, []).append(seconds)
            if steps:
                lines.append(f"- {entry['size']} {pipeline}: " + ", ".join(
                    f"{name} {statistics.median(values):.2f}" for name, values in steps.items()))
        f = entry["floor"]
        lines.append(f"- {entry['size']} floor: decompress {f['decompress_serial']:.2f} serial / "
                     f"{f['decompress_parallel']:.2f} parallel, compress {f['compress']:.2f}"
                     + (f", download {f['download']:.2f}" if f.get("download") else "")
                     + f"; CPU-seconds: decompress {f['decompress_cpu']:.2f}, compress {f['compress_cpu']:.2f}, "
                       f"so both on {os.cpu_count()} cores take at least {f['shared_cores']:.2f}")
    loads = [run["load"] for entry in sizes for run in entry["runs"]]
    busy = (f"; above {os.cpu_count()}, other work shared the cores and some times are pessimistic"
            if max(loads) > (os.cpu_count() or 1) else "")
    lines += ["", f"1-minute load average at the end of the runs: {min(loads):.1f} to {max(loads):.1f}{busy}."]
    lines += ["", "Same file tree:", ""]
    for entry in sizes:
        comparison = entry["comparison"]
        lines.append(f"- {entry['size']}: {comparison['verdict']}")
        lines += [f"    - {difference}" for difference in comparison["differences"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir = workdir / "runs"
    remove(runs_dir)
    runs_dir.mkdir()
    started = time.monotonic()
    session = Session(workdir)
    try:
        images = build_and_push(workdir, args.sizes, session.registry.url)
        log(f"images ready after {time.monotonic() - started:.0f} s")
        session.start_services()
        bench_started = time.monotonic()
        sizes = []
        for size in args.sizes:
            image, sibling = images[size]
            sizes.append(bench_size(session, size, image, sibling, args, runs_dir))
            (workdir / "results.json").write_text(json.dumps(sizes, indent=1, default=str))
        log(f"benchmark took {time.monotonic() - bench_started:.0f} s (images ready before)")
    finally:
        session.stop()
        if not args.keep:
            remove(runs_dir)
    text = report(sizes, args)
    (workdir / "results.md").write_text(text)
    print(text)
    log(f"written {workdir / 'results.md'} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
