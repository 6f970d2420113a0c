"""Doctor group ``data-dir``: the data directory (or its nearest existing parent) is writable
and its filesystem has room."""

from __future__ import annotations

import os
from pathlib import Path

from stormline.deploy.doctor.base import Check
from stormline.settings import Settings

# The embedded stack's floor: Kafka's log segments, Redis' append-only file, Parquet parts and
# checkpoints. A demo run takes a few hundred MB; 2 GiB leaves room for a day of work.
MIN_FREE_BYTES = 2 * 1024**3
_ELSEWHERE = (
    "set STORMLINE_DATA_DIR (or --data-dir) to a directory on a writable disk, e.g. "
    "~/.local/share/stormline"
)


def nearest_existing(path: Path) -> Path:
    p = path.expanduser().absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (which exists)."""
    p = path.resolve()
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_data_dir(settings: Settings, min_free: int = MIN_FREE_BYTES) -> list[Check]:
    data_dir = settings.data_dir.expanduser().absolute()
    if data_dir.exists() and not data_dir.is_dir():
        return [
            Check(
                "data-dir",
                False,
                f"{data_dir} exists and is not a directory",
                f"move that file aside, or {_ELSEWHERE}",
            )
        ]
    existing = nearest_existing(data_dir)
    where = (
        f"{data_dir}"
        if existing == data_dir
        else f"{data_dir} (not created yet; `stormline up` creates it in {existing})"
    )
    st = os.statvfs(existing)
    mount = mount_point(existing)
    return [
        _writable(where, existing, mount, read_only=bool(st.f_flag & os.ST_RDONLY)),
        _disk_space(data_dir, mount, st.f_bavail * st.f_frsize, min_free),
    ]


def _writable(where: str, existing: Path, mount: Path, *, read_only: bool) -> Check:
    """``existing`` (the data directory or its nearest existing parent) can be written to."""
    if read_only:
        return Check(
            "data-dir",
            False,
            f"{where}: the filesystem mounted at {mount} is read-only",
            f"remount {mount} read-write, or {_ELSEWHERE}",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(
            "data-dir",
            False,
            f"{where}: {existing} is not writable by this user (uid {os.geteuid()})",
            f"make it writable (chown/chmod {existing}), or {_ELSEWHERE}",
        )
    return Check("data-dir", True, f"{where} is writable")


def _disk_space(data_dir: Path, mount: Path, free: int, min_free: int) -> Check:
    """The filesystem mounted at ``mount`` has ``min_free`` bytes for the stack."""
    if free >= min_free:
        return Check("disk-space", True, f"{_size(free)} free on {mount}")
    big = [
        str(data_dir / sub)
        for sub in ("kafka", "clickhouse", "checkpoints", "logs")
        if (data_dir / sub).exists()
    ]
    hint = f" (the stack's own data: {', '.join(big)})" if big else ""
    return Check(
        "disk-space",
        False,
        f"only {_size(free)} free on {mount}, which holds {data_dir}; the embedded "
        f"stack needs at least {_size(min_free)} (Kafka logs, Redis, Parquet parts, "
        "checkpoints)",
        f"free at least {_size(min_free - free)} on {mount}{hint}, or set "
        "STORMLINE_DATA_DIR to a directory on a disk with "
        f"{_size(min_free)} free",
    )
