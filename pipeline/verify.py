"""Find damaged shards (``asym3d inspect DIR --verify``) and set them aside for a stage's ``--repair``.

Verification reads every stored array of every shard: raw arrays through HDF5's fletcher32 checksums, JPEG frames
against their CRC-32s (see :mod:`pipeline.store`), so one flipped byte anywhere in the data is found; and every
attribute the project writes (each video's label, class name, splits, frame count and source; the shard's schema,
failures and list of videos) against its SHA-256, as well as ``dataset.json`` and ``manifest.json``. A shard that
cannot be opened, or whose schema or video attributes cannot be parsed, is damaged as a whole.

Repair is the writing stage's job: :func:`set_aside_damaged` renames each damaged shard (and a damaged manifest) to
``<name>.damaged`` (kept for a post-mortem, no longer counted as complete) and the stage's normal resume recomputes
exactly those; the stage writes the manifest anew when it ends, and rebuilds a damaged ``dataset.json``
(:func:`pipeline.store.prepare_output`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.store import (MANIFEST_FILE, MANIFEST_KEYS, SCHEMA_FILE, SHARD_GLOB, DamagedError, Schema, StoreError,
                            configuration_differences, load_dataset_meta, metadata_damage, os_reason, read_checked,
                            read_dataset_meta, read_json_sealed, read_metadata, write_error)

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
            damage = [Damage(path, video_id, reason) for video_id, reason in metadata_damage(*read_metadata(f))[1]]
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
    """Damage in every complete shard of a stage output directory and in its manifest (dataset.json must pass its
    checksum: a damaged one is a one-line :class:`DamagedError` naming it)."""
    root = Path(root)
    schema = Schema.from_dict(load_dataset_meta(root)["schema"])
    if schema.version < 2:
        raise StoreError(f"{root}: format version {schema.version} shards carry no checksums, so they cannot be "
                         "verified (they still read; rebuild them with --overwrite to add checksums)")
    damage = [d for path in sorted(root.glob(SHARD_GLOB)) for d in verify_shard(path, schema)]
    manifest = root / MANIFEST_FILE
    if manifest.exists():
        try:
            read_json_sealed(manifest, MANIFEST_KEYS)
        except DamagedError as exc:
            damage.append(Damage(manifest, "", str(exc).removeprefix(f"{manifest}: ")))
    return damage


def unverifiable(root: Path) -> list[str]:
    """The files of ``root`` whose metadata carry no checksum (written before asym3d stored them): they read, and
    their arrays verify, but a changed label or split in them cannot be told from the original."""
    root = Path(root)
    names = [] if read_dataset_meta(root)[1] else [SCHEMA_FILE]
    for path in sorted(root.glob(SHARD_GLOB)):
        with h5py.File(path, "r") as f:
            if not metadata_damage(*read_metadata(f))[0]:
                names.append(path.name)
    manifest = root / MANIFEST_FILE
    if manifest.exists() and not read_json_sealed(manifest, MANIFEST_KEYS)[1]:
        names.append(MANIFEST_FILE)
    return names


def set_aside_damaged(root: Path) -> list[Damage]:
    """Verify ``root`` and rename every damaged shard (and a damaged manifest) to ``<name>.damaged``; returns the
    damage found.

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

