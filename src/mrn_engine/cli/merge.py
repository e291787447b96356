"""``mrn merge-shards``: join ``mrn predict --shard i/n`` outputs into one submission."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("merge-shards")
@click.argument(
    "shard_dirs",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder for the merged submission.",
)
def merge_shards_cmd(shard_dirs: tuple[Path, ...], out: Path) -> None:
    """Merge the OUT folders of `mrn predict --shard I/N` runs (all N of them) into OUT.

    Refuses shards of different bundles or settings, a missing or repeated shard, and cases
    missing, duplicated or changed. The result equals a single run's submission.
    """
    from mrn_engine.inference.merge import merge_shards

    result = merge_shards(shard_dirs, out)
    failed = f", {len(result.errors)} failed (see errors.json)" if result.errors else ""
    click.echo(f"merged {len(shard_dirs)} shard(s): {len(result.rows)} case(s){failed} -> {out}")
