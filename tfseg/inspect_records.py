"""Look at a records folder: its manifest as tables, and PNGs of a few slices per fold with mask contours."""

import argparse
import sys
from pathlib import Path

import numpy as np

from tfseg import CLASSES, cli, files, paths, records
from tfseg.errors import DataError


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells)


def summary(manifest: dict) -> str:
    """The manifest as a few plain-text tables: folds, classes, image sizes, skipped input."""
    settings, shards = manifest["settings"], manifest["shards"]
    fold_rows = []
    for f in [*manifest["folds"], {"fold": "all", "cases": manifest["num_cases"],
                                   "volumes": manifest["num_volumes"], "slices": manifest["num_slices"]}]:
        mine = [s for s in shards if f["fold"] in ("all", s["fold"])]
        fold_rows.append([f["fold"], f["cases"], f["volumes"], f["slices"], len(mine),
                          f"{sum(s['bytes'] for s in mine) / 1e6:.1f}"])
    slices = max(manifest["num_slices"], 1)
    class_rows = [[c, v["slices"], f"{100 * v['slices'] / slices:.1f}", v["pixels"],
                   round(v["pixels"] / max(v["slices"], 1))] for c, v in manifest["classes"].items()]
    size_rows = [[size, v["volumes"], v["slices"]] for size, v in sorted(manifest["image_sizes"].items())]
    parts = [
        f"records of {settings['data_dir']} (tfseg {manifest['tfseg_version']}, {settings['folds']} folds, "
        f"~{settings['shard_mb']} MB shards, on_error={settings['on_error']})",
        _table(["fold", "cases", "volumes", "slices", "shards", "MB"], fold_rows),
        _table(["class", "slices with organ", "% of slices", "pixels", "pixels/slice"], class_rows),
        _table(["size (WxH)", "volumes", "slices"], size_rows),
        f"skipped as bad input: {len(manifest['skipped'])}"
        + "".join(f"\n  {s['id']}: {s['reason']}" for s in manifest["skipped"][:10])
        + ("\n  ..." if len(manifest["skipped"]) > 10 else ""),
    ]
    return "\n\n".join(parts)


def _pick_slices(mask: np.ndarray, count: int) -> list[int]:
    """Where each organ is largest, then evenly spread slices with any organ (or any slice)."""
    pixels = mask.reshape(len(mask), -1, mask.shape[-1]).sum(axis=1)  # [D, classes]
    picks = [int(np.argmax(pixels[:, k])) for k in range(pixels.shape[1]) if pixels[:, k].any()]
    pool = np.flatnonzero(pixels.any(axis=1))
    pool = pool if len(pool) else np.arange(len(mask))
    for i in pool[np.linspace(0, len(pool) - 1, count).round().astype(int)]:
        if len(picks) < count and int(i) not in picks:
            picks.append(int(i))
    return sorted(picks[:count])


def write_overlays(records_dir: str | Path, out_dir: str | Path, per_fold: int = 4) -> list[Path]:
    """One PNG per fold (out_dir/fold{k}.png): slices of its first volume with the mask contours."""
    from tfseg.overlay import draw_contours, save_grid

    written = []
    for fold in range(records.read_manifest(records_dir)["settings"]["folds"]):
        volume = next(records.read_volumes(records_dir, [fold]), None)
        if volume is None:
            continue
        picks = _pick_slices(volume["mask"], per_fold)
        images = [draw_contours(volume["image"][i], volume["mask"][i]) for i in picks]
        titles = [f"fold {fold}: {volume['case_day']} slice {volume['slices'][i]}\n"
                  + ", ".join(c for k, c in enumerate(CLASSES) if volume["mask"][i, ..., k].any())
                  for i in picks]
        written.append(save_grid(images, titles, Path(out_dir) / f"fold{fold}.png", cols=per_fold))
    return written


def verify(records_dir: str | Path) -> list[str]:
    """Shards whose sha256 differs from the manifest's (or that are missing)."""
    bad = []
    for shard in records.read_manifest(records_dir)["shards"]:
        path = Path(records_dir) / shard["path"]
        if not path.is_file() or files.sha256(path) != shard["sha256"]:
            bad.append(shard["path"])
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.inspect_records",
        description="Print a records folder's manifest (folds, organ content, image sizes, skipped input) as "
                    "tables; optionally draw a few slices per fold with their mask contours.")
    parser.add_argument("records", nargs="?", default=paths.RECORDS_DIR,
                        help="records folder written by make_records (default: %(default)s)")
    parser.add_argument("--overlays", metavar="DIR", help="write DIR/fold{k}.png: slices with mask contours")
    parser.add_argument("--slices", type=int, default=4, help="slices per fold in the overlays (default: 4)")
    parser.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    args = parser.parse_args(argv)
    print(summary(records.read_manifest(args.records)))
    if args.verify:
        bad = verify(args.records)
        if bad:
            raise DataError(f"{args.records}: shard(s) missing or changed since they were written: "
                            f"{', '.join(bad)}")
        print("\nevery shard matches its sha256 in the manifest")
    if args.overlays:
        for path in write_overlays(args.records, args.overlays, args.slices):
            print(f"overlay: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
