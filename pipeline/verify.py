"""Find damaged shards (``asym3d inspect DIR --verify``) and set them aside for a stage's ``--repair``.

Verification reads every stored array of every shard: raw arrays through HDF5's fletcher32 checksums, JPEG frames
against their CRC-32s (see :mod:`pipeline.store`), so one flipped byte anywhere in the data is found. A shard that
cannot be opened, or whose schema or video attributes cannot be parsed, is damaged as a whole.

Repair is the writing stage's job: :func:`set_aside_damaged` renames each damaged shard to ``shard-N.h5.damaged``
(kept for a post-mortem, no longer counted as complete) and the stage's normal resume recomputes exactly those.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.store import (SHARD_GLOB, DamagedError, Schema, StoreError, configuration_differences,
                            load_dataset_meta, os_reason, read_checked, write_error)

DAMAGED_SUFFIX = ".damaged"


@dataclass(frozen=True)
class Damage:
    shard: Path
    video_id: str  # "" when the shard as a whole is damaged (cannot be opened or parsed)
    reason: str

    def __str__(self) -> str:
        where = f"{self.shard}: video {self.video_id!r}" if self.video_id else str(self.shard)
        return f"{where}: {self.reason}"


def verify_shard(path: Path, schema: Schema) -> list[Damage]:
    """Every damaged video of one shard (or one whole-shard entry); empty when every stored array is intact."""
    try:
        with h5py.File(path, "r") as f:
            diff = configuration_differences(json.loads(f.attrs["asym3d_schema"]), schema.to_dict())
            if diff:
                return [Damage(path, "", f"its schema differs from dataset.json ({'; '.join(diff[:3])})")]
            json.loads(f.attrs.get("failures", "[]"))
            keys = list(f["videos"])
            damage = []
            for key in keys:
                damage.extend(_verify_video(path, f["videos"], key, schema))
            return damage
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return [Damage(path, "", f"cannot be read ({os_reason(exc)})")]


def _verify_video(path: Path, videos: h5py.Group, key: str, schema: Schema) -> list[Damage]:
    try:
        group = videos[key]
        video_id = str(group.attrs["video_id"])
        int(group.attrs["n_frames"])
        json.loads(group.attrs["splits"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return [Damage(path, f"(entry {key})", f"unreadable attributes ({os_reason(exc)})")]
    damage = []
    for spec in schema.fields:
        try:
            read_checked(group, spec)
        except (OSError, KeyError) as exc:
            damage.append(Damage(path, video_id, f"field {spec.name!r}: {os_reason(exc)}"))
        except DamagedError as exc:
            damage.append(Damage(path, video_id, f"field {spec.name!r}: {exc}"))
    return damage


def verify_dir(root: Path) -> list[Damage]:
    """Damage in every complete shard of a stage output directory (dataset.json must be readable)."""
    root = Path(root)
    schema = Schema.from_dict(load_dataset_meta(root)["schema"])
    if schema.version < 2:
        raise StoreError(f"{root}: format version {schema.version} shards carry no checksums, so they cannot be "
                         "verified (they still read; rebuild them with --overwrite to add checksums)")
    return [d for path in sorted(root.glob(SHARD_GLOB)) for d in verify_shard(path, schema)]


def set_aside_damaged(root: Path) -> list[Damage]:
    """Verify ``root`` and rename every damaged shard to ``<name>.damaged``; returns the damage found.

    The caller holds the directory's lock, and its stage then recomputes the renamed shards; intact shards are not
    touched.
    """
    damage = verify_dir(root)
    for shard in sorted({d.shard for d in damage}):
        target = shard.with_name(shard.name + DAMAGED_SUFFIX)
        try:
            os.replace(shard, target)
        except OSError as exc:
            raise write_error(target, exc) from None
    return damage

