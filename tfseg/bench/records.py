"""make_records speed: slices/s with 1 and with 2 workers, measured in one run on full-scale synthetic data.

The data set (data/synth-full: 85 cases, 274 case-days, 38,496 slices like the real one) is made
first if missing. --limit-volumes N times N case-days spread over it instead (linked, not copied),
or N synthetic case-days made for the purpose when data/synth-full does not exist. Scans are read
once before timing so both runs find them in the page cache.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

from tfseg import cli, layout

FULL_DATA_DIR = "data/synth-full"
FULL_SLICES = 38_496  # the real data set, which data/synth-full mirrors


def add_arguments(parser) -> None:
    parser.add_argument("--data-dir", default=FULL_DATA_DIR,
                        help="Kaggle-layout data; made with tfseg.synth (full scale) if missing "
                             "(default: %(default)s)")
    parser.add_argument("--limit-volumes", type=cli.at_least(1), metavar="N",
                        help="time only N case-days spread over the data set (default: all)")
    parser.add_argument("--num-folds", type=cli.at_least(1), default=5, metavar="N",
                        help="how many folds (default: 5, fewer if fewer cases)")
    cli.add_renamed(parser, "--folds", "--num-folds", type=cli.at_least(1))


def _subset(data_dir: Path, count: int, into: Path) -> Path:
    """A layout of `count` case-days spread evenly over data_dir: folders linked, train.csv filtered."""
    days = sorted(p for p in (data_dir / "train").glob("case*/case*_day*") if p.is_dir())
    step = max(len(days) / max(count, 1), 1.0)
    chosen = [days[int(i * step)] for i in range(min(count, len(days)))]
    for day in chosen:
        link = into / "train" / day.parent.name / day.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(day.resolve(), target_is_directory=True)
    names = tuple(f"{day.name}_slice_" for day in chosen)
    lines = (data_dir / "train.csv").read_text().splitlines()
    rows = [lines[0], *(line for line in lines[1:] if line.startswith(names))]
    (into / "train.csv").write_text("\n".join(rows) + "\n")
    return into


def _dataset(data_dir: Path, limit: int | None) -> Path:
    """data_dir, made first if missing: full scale, or (with --limit-volumes and the default folder)
    just `limit` one-day cases of the real size mix, which is much quicker to make."""
    if (data_dir / "train.csv").exists():
        return data_dir
    from tfseg.kaggle import synth

    if limit and str(data_dir) == FULL_DATA_DIR:
        data_dir = Path(f"{FULL_DATA_DIR}-sample{limit}")
        print(f"{FULL_DATA_DIR} is missing: timing {limit} synthetic case-days in {data_dir} instead")
        return synth.make_dataset(data_dir, cases=limit, days=1)
    print(f"making the full-scale synthetic data set in {data_dir} (once; 38,496 slices)")
    return synth.make_dataset(data_dir, full=True)


def run(args) -> dict:
    from tfseg.records.writer import build_records  # pandas: not for `python -m tfseg.bench --help`

    data_dir = _dataset(Path(args.data_dir), args.limit_volumes)
    work = Path(layout.RECORDS_DIR).parent
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-records-", dir=work) as tmp:
        tmp = Path(tmp)
        volumes = len(list(data_dir.glob("train/*/*/scans")))
        limited = args.limit_volumes and args.limit_volumes < volumes
        source = _subset(data_dir, args.limit_volumes, tmp / "data") if limited else data_dir
        for scan in sorted(source.glob("train/*/*/scans/*.png")):
            scan.read_bytes()  # warm the page cache: both runs read from memory
        cases = len({p.name for p in (source / "train").iterdir()})
        load_before = os.getloadavg()[0]  # others' work skews timings: reported with them
        figures, shards = {}, {}
        for workers in (1, 2):
            out = tmp / f"workers{workers}"
            start = time.perf_counter()
            manifest = build_records(source, out, folds=min(args.num_folds, cases), workers=workers,
                                     progress=False)
            seconds = time.perf_counter() - start
            figures[f"slices_per_s_{workers}"] = manifest["num_slices"] / seconds
            shards[workers] = [s["sha256"] for s in manifest["shards"]]
            print(f"{workers} worker(s): {manifest['num_slices']} slices in {seconds:.1f} s")
            shutil.rmtree(out)  # full-scale records are GBs: keep one copy at a time
    return {
        "num_slices": manifest["num_slices"],
        "slices_per_s_1": figures["slices_per_s_1"],
        "slices_per_s_2": figures["slices_per_s_2"],
        "speedup_2_vs_1": figures["slices_per_s_2"] / figures["slices_per_s_1"],
        "full_dataset_minutes_2": FULL_SLICES / figures["slices_per_s_2"] / 60,
        "same_bytes_1_vs_2": float(shards[1] == shards[2]),
        "load_average_before": load_before,
    }
