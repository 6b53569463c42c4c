"""`bkd-edge data ...`: import, inspect and download session data."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import click

from .. import BkdError
from ..data import BUNDLEREC_FILES, OPTIONAL_FILES, import_bundlerec, load_sessions, stats, write_sessions
from ..files import atomic_write, claim_output
from ..tables import table

DOWNLOAD_BASE = "https://github.com/BundleRec/bundle_recommendation/raw/HEAD/dataset"
DOMAINS = ("electronic", "clothing", "food")


@click.group()
def data():
    """Import, inspect and download session data."""


@data.group("import")
def import_():
    """Convert a public data layout to the project's sessions JSONL."""


@import_.command("bundlerec")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Sessions JSONL to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the 70/10/20 train/val/test split.")
@click.option("--prefix", default="", help="Prefix for session ids, e.g. 'e' for Electronic.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
def import_bundlerec_cmd(folder, out, seed, prefix, force, as_json):
    """Import a BundleRec domain FOLDER (session_item.csv, session_bundle.csv, bundle_item.csv, ...).

    Applies the preprocessing of the paper's line of work: keep sessions with >= 1 bundle,
    drop exact-duplicate bundles and bundles that strictly contain another bundle of the
    same session, and split train/val/test ~70/10/20 with a fixed seed.
    """
    click.get_current_context().with_resource(claim_output(out, [folder], force))
    sessions, report = import_bundlerec(folder, seed=seed, prefix=prefix)
    write_sessions(out, sessions)
    report["out"] = str(out)
    report["splits"] = {k: v["sessions"] for k, v in stats(sessions).items() if k != "all"}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{report['sessions_out']} sessions, {report['bundles_out']} bundles "
            f"(from {report['sessions_in']} sessions, {report['bundles_in']} bundles) -> {out}"
        )


@data.command("stats")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats_cmd(file, as_json):
    """Per split: sessions, items, bundles, bundles/session, mean bundle size, items without a title,
    the share of items with category paths and their mean depth."""
    result = stats(load_sessions(file))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = [{"split": name, **values} for name, values in result.items()]
    columns = [
        ("split", "split", ""),
        ("sessions", "sessions", ""),
        ("items", "items", ""),
        ("unique_items", "unique items", ""),
        ("bundles", "bundles", ""),
        ("bundles_per_session", "bundles/session", ".2f"),
        ("mean_bundle_size", "mean bundle size", ".2f"),
        ("mean_session_length", "items/session", ".2f"),
        ("items_without_title", "items without title", ""),
        ("category_coverage", "items with categories", ".1%"),
        ("category_mean_depth", "category depth", ".2f"),
    ]
    click.echo(table(rows, columns))


@data.command("download")
@click.option("--domain", type=click.Choice(DOMAINS), required=True, help="Which BundleRec domain.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per file.")
@click.option(
    "--base-url",
    default=DOWNLOAD_BASE,
    show_default=True,
    help="Where the dataset/ folder lives (a mirror, or a local file server).",
)
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def download_cmd(domain, timeout, base_url, folder):
    """Download a domain's public BundleRec CSVs into FOLDER, then import them with `data import`.

    Files are written only once every required file has arrived, so a failed download
    leaves nothing behind that `data import` could mistake for a complete folder.
    """
    click.get_current_context().with_resource(claim_output(folder, exists_ok=True, option="FOLDER"))
    bodies = {}
    for name in BUNDLEREC_FILES:
        url = f"{base_url.rstrip('/')}/{domain}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            if name in OPTIONAL_FILES and isinstance(e, urllib.error.HTTPError) and e.code == 404:
                continue
            reason = getattr(e, "reason", e)
            raise BkdError(
                f"could not download {url}: {reason}. Without network access, fetch the CSVs of "
                f"dataset/{domain}/ from the BundleRec/bundle_recommendation repository by hand into {folder}"
            ) from None
        bodies[name] = body
    for name, body in bodies.items():
        with atomic_write(Path(folder) / name, "wb") as f:
            f.write(body)
        click.echo(f"{name}: {len(body):,} bytes")
    click.echo(f"next: bkd-edge data import bundlerec {folder} --out {domain}.jsonl --prefix {domain[0]}")
