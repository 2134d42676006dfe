"""make_records' shard files: hidden temp shards written in order, a state file that lists the finished
ones (with sha256) so a killed run resumes after them, and the clean-up of an earlier run's temp files."""

import json
import re
from pathlib import Path

from tfseg import files
from tfseg.layout import MANIFEST, shard_name
from tfseg.records.volumes import TEMP_VOLUME

STATE = ".make_records-state.json"
TEMP_SHARD = re.compile(r"\.fold\d+-\d{5}\.tfrecord\.tmp")
ATOMIC_TEMP = re.compile(rf"\.({re.escape(MANIFEST)}|{re.escape(STATE)})\..+\.tmp")  # files.atomic_path's
RECORD_OVERHEAD = 16  # TFRecord framing per record: length, its CRC, the data's CRC


class ShardWriter:
    """Writes records in order into hidden temp shards of about `limit` bytes, one fold at a time,
    and lists every finished shard in the state file (so a killed run can resume after it)."""

    def __init__(self, out: Path, limit: float, state: dict, open_writer):
        self.out, self.limit, self.state, self.open_writer = out, limit, state, open_writer
        self.writer = self.current = None

    def add(self, task_index: int, record: bytes | None, info: dict) -> None:
        cur = self.current
        if record is not None and cur and (
                cur["fold"] != info["fold"] or cur["bytes"] + len(record) + RECORD_OVERHEAD > self.limit):
            self.close(task_index)
        self.state["infos"].append(info)
        if record is None:
            return
        if self.current is None:
            fold = info["fold"]
            index = sum(s["fold"] == fold for s in self.state["shards"])
            self.current = {"fold": fold, "index": index, "temp": f".fold{fold}-{index:05d}.tfrecord.tmp",
                            "bytes": 0, "volumes": 0, "slices": 0}
            self.writer = self.open_writer(str(self.out / self.current["temp"]))
        self.writer.write(record)
        self.current["bytes"] += len(record) + RECORD_OVERHEAD
        self.current["volumes"] += 1
        self.current["slices"] += info["slices"]

    def close(self, next_task: int) -> None:
        if self.current is None:
            return
        self.writer.close()
        shard, self.current, self.writer = self.current, None, None
        path = self.out / shard["temp"]
        shard.update(bytes=path.stat().st_size, sha256=files.sha256(path), next_task=next_task)
        self.state["shards"].append(shard)
        files.write_json(self.out / STATE, self.state)

    def abandon(self) -> None:
        """After an error: drop the unfinished shard (finished ones stay listed for a rerun)."""
        if self.writer is not None:
            self.writer.close()
            (self.out / self.current["temp"]).unlink(missing_ok=True)
        self.writer = self.current = None


def final_name(shard: dict, shards: list[dict]) -> str:
    return shard_name(shard["fold"], shard["index"], sum(s["fold"] == shard["fold"] for s in shards))


def _intact(path: Path, shard: dict) -> bool:
    return path.is_file() and path.stat().st_size == shard["bytes"] and files.sha256(path) == shard["sha256"]


def resume(out: Path, key: dict, n_tasks: int) -> dict:
    """The state of an earlier run with the same key, cut to its shards that are still intact."""
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        state = None
    if not state or state.get("key") != key:
        return {"key": key, "shards": [], "infos": []}
    done = state["shards"]
    finished = bool(done) and done[-1]["next_task"] == n_tasks
    good = []
    for shard in done:  # a kill during the final renames leaves some shards under their final names
        temp_ok = _intact(out / shard["temp"], shard)
        if not (temp_ok or (finished and _intact(out / final_name(shard, done), shard))):
            break
        good.append(dict(shard, renamed=not temp_ok))
    state["shards"] = good
    state["infos"] = state["infos"][:good[-1]["next_task"] if good else 0]
    return state


def clean(out: Path, keep: set[str]) -> None:
    """Remove temp files of earlier runs except the finished shards being reused."""
    for path in out.iterdir():
        if ((TEMP_SHARD.fullmatch(path.name) and path.name not in keep) or ATOMIC_TEMP.fullmatch(path.name)
                or TEMP_VOLUME.fullmatch(path.name)):
            path.unlink(missing_ok=True)

