"""What a pull did, left in the Prefect UI as an artifact of its flow run."""

from __future__ import annotations

import re
from uuid import UUID

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from imagegw.pullreport import PullReport
from tasks.retry import prefect_api_unreachable

OVERLAP_NOTE = "pull, unpack and squash run side by side: their times overlap and do not add up."


# Retried for as long as a Prefect server takes to restart: the image is READY by now, and a report lost
# to a restart would fail the run of a pull that succeeded.
@task(name="report", retries=3, retry_delay_seconds=[2, 8, 20], retry_condition_fn=prefect_api_unreachable,
      cache_policy=NONE)
def report_pull(report: PullReport) -> UUID:
    """Leave the pull's report as a markdown artifact, a new version of its image's key on every pull."""
    return create_markdown_artifact(
        markdown=pull_markdown(report), key=artifact_key(report),
        description=f"{report.image} on {report.platform}: {report.manifest_digest}")


def artifact_key(report: PullReport) -> str:
    """``pull-<platform>-<image>``, squeezed into what Prefect allows in a key: lowercase letters, digits, dashes."""
    return "-".join(["pull", _key_part(report.platform), _key_part(report.image)])


def _key_part(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pull_markdown(report: PullReport) -> str:
    """The report as two tables: what was pulled and built, and each stage's wall time."""
    if report.already_ready:
        outcome = ("Already READY: the digest is unchanged, so nothing was downloaded or built; "
                   "the record was refreshed.")
        built = [f"| squashfs | {_amount(report.squashfs_size)} (as published before) |"]
    else:
        outcome = "Pulled, built and published: READY."
        built = [f"| squashfs | {_amount(report.squashfs_size)} |", f"| compressor | {report.compression} |"]
    lines = [
        f"### pull {report.image} for {report.platform}", "", outcome, "",
        "| | |", "|---|---|",
        f"| image | {report.image} |",
        f"| platform | {report.platform} |",
        f"| manifest digest | `{report.manifest_digest}` |",
        f"| architecture | {report.architecture} |",
        f"| layers | {report.layers} |",
        f"| layers fetched | {report.layers_fetched} |",
        f"| layers from the cache | {report.layers_cached} |",
        f"| downloaded | {_amount(report.bytes_downloaded)} |",
        *built,
        f"| published | {report.published} |",
        "", "| stage | wall time |", "|---|---|",
        *(f"| {stage.stage} | {stage.seconds:.2f} s |" for stage in report.stages),
    ]
    if not report.already_ready:
        lines += ["", OVERLAP_NOTE]
    return "\n".join(lines)


def _amount(size: int) -> str:
    """``4.2 MB (4200000 bytes)``: readable at a glance, exact for whoever compares it with the registry."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size} bytes)"
    return f"{size} bytes"
