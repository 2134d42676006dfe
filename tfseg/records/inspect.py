"""Look at a records folder: its manifest as tables, and PNGs of a few slices per fold with mask contours."""

from pathlib import Path

from tfseg import CLASSES
from tfseg.draw import draw_contours, pick_slices, save_grid
from tfseg.layout import read_manifest
from tfseg.records.reader import read_volumes


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells)


def summary(manifest: dict) -> str:
    """The manifest as a few plain-text tables: folds, classes, image sizes, skipped and excluded input."""
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
        _mislabelled(manifest),
    ]
    return "\n\n".join(parts)


def _mislabelled(manifest: dict) -> str:
    if "excluded" not in manifest:  # written before make_records knew of mislabelled case-days
        return "known-mislabelled case-days: not recorded (records made before make_records listed them)"
    lines = f"excluded as known mislabelled: {len(manifest['excluded'])}" + "".join(
        f"\n  {e['id']}: {e['reason']}" for e in manifest["excluded"])
    if manifest.get("kept_mislabelled"):
        lines += (f"\nkept although known mislabelled (--keep-mislabelled): "
                  f"{', '.join(manifest['kept_mislabelled'])}")
    return lines


def write_overlays(records_dir: str | Path, out_dir: str | Path, per_fold: int = 4) -> list[Path]:
    """One PNG per fold (out_dir/fold{k}.png): slices of its first volume with the mask contours."""
    written = []
    for fold in range(read_manifest(records_dir)["settings"]["folds"]):
        volume = next(read_volumes(records_dir, [fold]), None)
        if volume is None:
            continue
        picks = pick_slices(volume["mask"], per_fold)
        images = [draw_contours(volume["image"][i], volume["mask"][i]) for i in picks]
        titles = [f"fold {fold}: {volume['case_day']} slice {volume['slices'][i]}\n"
                  + ", ".join(c for k, c in enumerate(CLASSES) if volume["mask"][i, ..., k].any())
                  for i in picks]
        written.append(save_grid(images, titles, Path(out_dir) / f"fold{fold}.png", cols=per_fold))
    return written

