"""manifest.json of a records folder: what it holds (folds, organ content, sizes, skipped input, case-days
excluded as known mislabelled), the settings it was made with, and the swap that makes a finished folder
complete."""

import os
from pathlib import Path

from tfseg import CLASSES, __version__, files
from tfseg.kaggle.index import MISLABELLED_REASON
from tfseg.layout import MANIFEST, SHARD_PATTERN
from tfseg.records.shards import STATE, final_name


def _difference(key: str, before, after) -> str:
    if key == "input_fingerprint":
        return "the input data (train.csv or scan files) changed"
    if key == "excluded_mislabelled":
        return (f"known-mislabelled case-days left out: {', '.join(before or []) or 'none'} -> "
                f"{', '.join(after or []) or 'none'} (make_records leaves them out unless --keep-mislabelled; "
                "records made before that rule kept them)")
    return f"{key} {before!r} -> {after!r}"


def differences(old: dict, settings: dict) -> list[str]:
    before = old.get("settings", {})
    diffs = [_difference(k, before.get(k), settings.get(k))
             for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if old.get("tfseg_version") != __version__:
        diffs.append(f"tfseg version {old.get('tfseg_version')!r} -> {__version__!r}")
    return diffs


def build_manifest(settings: dict, shards: list[dict], infos: list[dict], skipped: list[dict],
                   kept_mislabelled: list[str] = ()) -> dict:
    stored = [i for i in infos if i["stored"]]
    folds = []
    for k in range(settings["folds"]):
        vols = [i for i in stored if i["fold"] == k]
        cases = sorted({i["case"] for i in vols})
        folds.append({"fold": k, "cases": len(cases), "volumes": len(vols),
                      "slices": sum(i["slices"] for i in vols), "case_ids": cases})
    sizes: dict[str, dict] = {}
    for i in stored:
        entry = sizes.setdefault(i["size"], {"volumes": 0, "slices": 0})
        entry["volumes"] += 1
        entry["slices"] += i["slices"]
    return {
        "tfseg_version": __version__,
        "settings": settings,
        "num_volumes": len(stored),
        "num_slices": sum(i["slices"] for i in stored),
        "num_cases": len({i["case"] for i in stored}),
        "folds": folds,
        "classes": {c: {"slices": sum(i["organ_slices"][j] for i in stored),
                        "pixels": sum(i["organ_pixels"][j] for i in stored)} for j, c in enumerate(CLASSES)},
        "image_sizes": sizes,  # "WxH" -> volumes, slices
        "shards": [{"path": final_name(s, shards), "fold": s["fold"], "volumes": s["volumes"],
                    "slices": s["slices"], "bytes": s["bytes"], "sha256": s["sha256"]} for s in shards],
        "skipped": skipped + [s for i in infos for s in i["skipped"]],
        "excluded": [{"id": d, "reason": MISLABELLED_REASON} for d in settings.get("excluded_mislabelled", [])],
        "kept_mislabelled": list(kept_mislabelled),  # in the data, kept on request (--keep-mislabelled)
    }


def finish(out: Path, manifest: dict, state: dict) -> None:
    """Swap in the new shards: the old manifest goes first, so the folder never looks complete half-way."""
    (out / MANIFEST).unlink(missing_ok=True)
    final = {s["path"] for s in manifest["shards"]}
    for path in out.iterdir():
        if SHARD_PATTERN.fullmatch(path.name) and path.name not in final:
            path.unlink()
    for shard, entry in zip(state["shards"], manifest["shards"], strict=True):
        if not shard.get("renamed"):
            os.replace(out / shard["temp"], out / entry["path"])
    files.write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)


