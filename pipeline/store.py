"""HDF5 shard storage shared by every stage: a declared schema, atomic shard writes, and one reader.

A stage output directory holds:

- ``dataset.json``: written when a run starts. The schema (what each stored field is, its dtype, encoding and
  precision, and the algorithm and parameters that made it), the dataset's classes and the shard plan (which video
  ids go to which shard): the output's identity. A later run into the same directory must declare the same or is
  refused (see :func:`prepare_output`). Beside it, ``recorded``: what ran (library versions, backend, device,
  runtime limits), which is recorded, also in each shard, but never compared: a rerun after a library upgrade or
  with a longer timeout continues the output, with a warning naming changed versions.
- ``shard-NNNNN.h5``: written under a temporary name (:func:`atomic_output`) and renamed when complete, so a file with
  the final name is always whole. A rerun skips those and redoes the rest. Each shard carries the schema too, so a
  lone shard still says what it is.
- ``manifest.json``: derived from the shards after a run (every video, its shard, frame count, label, status and
  failure reason). The shards are the truth; the manifest is an index for people and tools.

Inside a shard, video ``i`` of the shard lives in group ``videos/NNNN`` (ids are attributes, so any id string is
safe) with one dataset per field. Image fields are either raw ``uint8`` arrays ``(T, H, W, C)`` chunked per frame
(optionally compressed), or JPEG bytes per frame in a variable-length dataset. Numeric fields (e.g. flow) are stored
as ``value * scale`` in the declared dtype and read back as float32.

Integrity: every raw array carries HDF5's fletcher32 checksum per chunk (h5py raises on a mismatch when the chunk is
read). HDF5 cannot checksum variable-length data, so a JPEG field ``name`` has a sibling ``name.crc32`` array (one
CRC-32 per frame, itself fletcher32-checked), compared on every read. HDF5 checksums no attribute either (its
default object headers carry none), yet the attributes say what the arrays mean (a video's label, class name,
splits, frame count, source; the shard's schema and failures), so each video group and each shard carry
``asym3d_digest``, the SHA-256 of their other attributes (the shard's also of its list of videos), checked by every
reader (:func:`video_entries`). ``dataset.json`` and ``manifest.json`` carry theirs as a ``checksum`` key
(:func:`write_json_sealed`). Shards and files written before these checksums still read; they cannot be verified,
and ``inspect --verify`` says so. :mod:`pipeline.verify` reads everything.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np

from pipeline.errors import Asym3dError

FORMAT_VERSION = 2  # 2: fletcher32 on raw arrays, CRC-32 per JPEG frame
READABLE_VERSIONS = (1, 2)  # version 1 (no checksums) still reads, so days of computed flow stay usable
SCHEMA_FILE = "dataset.json"
MANIFEST_FILE = "manifest.json"
SHARD_GLOB = "shard-*.h5"
TMP_GLOB = "*.tmp.*"  # what atomic_output leaves behind when its process is killed
CRC_SUFFIX = ".crc32"
DIGEST_ATTR = "asym3d_digest"  # a shard's and each video group's metadata checksum (see the module docstring)
CHECKSUM_KEY = "checksum"  # the same for dataset.json and manifest.json
# What shards and JSON files held before they carried checksums: such a one reads, unverified. Any other name (a
# flipped bit in the checksum's own name) is damage, so a checksum can never go missing unnoticed.
LEGACY_SHARD_ATTRS = frozenset({"asym3d_schema", "asym3d_recorded", "asym3d_shard", "failures"})
LEGACY_VIDEO_ATTRS = frozenset({"video_id", "label", "label_name", "source", "n_frames", "splits"})
SCHEMA_KEYS = frozenset({"schema", "dataset", "plan", "recorded"})
MANIFEST_KEYS = frozenset({"schema", "summary", "videos", "pending"})


class StoreError(Asym3dError):
    """A shard directory that cannot be used: missing, from another format version, or another configuration."""


class DamagedError(StoreError):
    """Stored data that fails its checksum or cannot be parsed; the message names the file (and video)."""


def os_reason(exc: BaseException) -> str:
    """The operating system's reason ("No space left on device") rather than h5py's multi-line driver report."""
    errno_ = getattr(exc, "errno", None)
    if errno_:
        return os.strerror(errno_)
    text = str(exc).strip()
    if "filter returned failure during read" in text:  # HDF5's words for a fletcher32 mismatch
        return "stored data fails its fletcher32 checksum"
    return text.splitlines()[0] if text else type(exc).__name__


def hdf5_io_error(exc: BaseException) -> OSError | None:
    """The operating-system error inside an HDF5 failure that h5py raises as ``RuntimeError`` (a failed flush:
    "Unable to synchronously flush file (file write failed: ... errno = 28 ...)"), else None."""
    match = re.search(r"errno = (\d+)", str(exc)) if isinstance(exc, RuntimeError) else None
    if match is None or not int(match.group(1)):
        return None
    return OSError(int(match.group(1)), os.strerror(int(match.group(1))))


def write_error(path: Path, exc: BaseException) -> StoreError:
    return StoreError(f"{path}: cannot write ({os_reason(exc)})")


def damaged_shard(path: Path | str, exc: BaseException) -> DamagedError:
    """The one message for a shard that cannot be opened or parsed: what failed, and how to find and redo it."""
    path = Path(path)
    return DamagedError(f"{path}: damaged shard ({os_reason(exc)}); see asym3d inspect {path.parent} --verify, and "
                        "--repair on the stage that wrote it")


def _discard(path: Path) -> None:
    """Delete a temporary file. Emptied first: a writer whose close failed (HDF5 after a failed flush) still holds it
    open, and an unlinked file keeps its blocks while open, so a full disk would stay full for the next write."""
    try:
        os.truncate(path, 0)
    except OSError:
        pass
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only filesystem cannot hold the temporary file either
        pass


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; rename it onto ``path`` when the block ends cleanly, else delete it.

    Every file asym3d writes goes through here, so a crash, a full disk or a read-only filesystem never leaves a
    partial file under a final name, and never touches the previous version of ``path``. The temporary name carries
    the process id, so two processes can never write into the same temporary file. An ``OSError`` (disk full,
    read-only filesystem, permissions) becomes a one-line :class:`StoreError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise write_error(path, exc) from None
    except BaseException:
        _discard(tmp)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def link_atomic(source: Path | str, path: Path | str) -> None:
    """Give ``path`` the contents of ``source`` without writing them again: a hard link, renamed into place.

    Only for files that are replaced by rename, never changed in place (everything :func:`atomic_output` writes):
    the two names then part when either is next rewritten. A filesystem without hard links gets a copy."""
    with atomic_output(path) as tmp:
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(source, tmp)


def read_json(path: Path | str) -> Any:
    """A JSON file asym3d wrote; a missing, unreadable or damaged one is a one-line :class:`StoreError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedError(f"{path}: unreadable ({os_reason(exc)})") from None


def content_digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON: the checksum of metadata (attributes, dataset.json, manifests)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def write_json_sealed(path: Path | str, doc: dict[str, Any]) -> None:
    """Write ``doc`` atomically with its own checksum under :data:`CHECKSUM_KEY` (see :func:`read_json_sealed`)."""
    write_text_atomic(path, json.dumps({CHECKSUM_KEY: content_digest(as_json(doc)), **doc}, indent=1))


def read_json_sealed(path: Path | str, legacy_keys: frozenset[str]) -> tuple[dict[str, Any], bool]:
    """A JSON object written by :func:`write_json_sealed`, without its checksum, and whether it carried one.

    A file whose content does not match its checksum (one flipped bit, an edit by hand) is a one-line
    :class:`DamagedError` naming it. One written before checksums (its keys among ``legacy_keys``) reads, unverified.
    """
    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DamagedError(f"{path}: unreadable (not a JSON object)")
    stored = doc.pop(CHECKSUM_KEY, None)
    remedy = "rerun the stage that wrote it with --repair to rebuild it from the shards"
    if stored is None:
        unknown = sorted(set(doc) - legacy_keys)
        if unknown:
            raise DamagedError(f"{path}: damaged (no checksum, and unexpected keys {', '.join(unknown)}); {remedy}")
        return doc, False
    if stored != content_digest(doc):
        raise DamagedError(f"{path}: damaged (its content does not match its checksum); {remedy}")
    return doc, True


def _plain(value: Any) -> Any:
    """An attribute value as JSON can hold it (h5py returns numpy scalars for numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def _attributes(obj: h5py.Group) -> dict[str, Any]:
    """Every attribute of ``obj`` as JSON values, its checksum included; read once (reading is most of the cost)."""
    return {name: _plain(value) for name, value in obj.attrs.items()}


def _checked(attributes: dict[str, Any]) -> dict[str, Any]:
    """What a checksum covers: every attribute but the checksum itself."""
    return {name: value for name, value in attributes.items() if name != DIGEST_ATTR}


def _shard_digest(attributes: dict[str, Any], videos: list[tuple[str, dict[str, Any]]]) -> str:
    """The shard's own attributes and its list of videos (group name and id), so a video cannot vanish or move."""
    listed = [[key, video.get("video_id")] for key, video in videos]
    return content_digest({"attributes": _checked(attributes), "videos": listed})


def read_metadata(f: h5py.File) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The attributes of an open shard and of each of its video groups (``(group name, attributes)``), unchecked."""
    return _attributes(f), [(key, _attributes(group)) for key, group in f["videos"].items()]


def seal_shard(f: h5py.File) -> None:
    """Write the metadata checksums of an open, writable shard: each video group's, then the shard's."""
    for group in f["videos"].values():
        group.attrs[DIGEST_ATTR] = content_digest(_checked(_attributes(group)))
    attributes, videos = read_metadata(f)
    f.attrs[DIGEST_ATTR] = _shard_digest(attributes, videos)


def metadata_damage(attributes: dict[str, Any], videos: list[tuple[str, dict[str, Any]]]
                    ) -> tuple[bool, list[tuple[str, str]]]:
    """Whether a shard (its :func:`read_metadata`) carries metadata checksums, and each ``(video id or "", reason)``
    they find damaged.

    A shard without any checksum (written before them) is readable but unverifiable; an attribute name it could not
    have had then is damage (a flipped bit in a checksum's own name)."""
    def name(key: str, video: dict[str, Any]) -> str:
        return str(video.get("video_id", f"(entry {key})"))

    damage = []
    if DIGEST_ATTR not in attributes and not any(DIGEST_ATTR in video for _, video in videos):
        if set(attributes) - LEGACY_SHARD_ATTRS:
            damage.append(("", f"unexpected attributes {', '.join(sorted(set(attributes) - LEGACY_SHARD_ATTRS))}"))
        for key, video in videos:
            if set(video) - LEGACY_VIDEO_ATTRS:
                damage.append((name(key, video), "unexpected attributes "
                               f"{', '.join(sorted(set(video) - LEGACY_VIDEO_ATTRS))}"))
        return False, damage
    for key, video in videos:
        if video.get(DIGEST_ATTR) != content_digest(_checked(video)):
            damage.append((name(key, video), "metadata (label, class name, splits, frame count, source) fails its "
                                             "checksum"))
    if attributes.get(DIGEST_ATTR) != _shard_digest(attributes, videos):
        damage.append(("", "shard attributes (schema, failures, list of videos) fail their checksum"))
    return True, damage


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


@dataclass(frozen=True)
class FieldSpec:
    """How one per-video array is stored.

    ``frames_offset`` says how the field's frame count relates to the video's: flow has one frame fewer
    (pairs t -> t+1), so it is -1.
    """

    name: str
    channels: int
    dtype: str = "uint8"  # stored dtype
    encoding: str = "raw"  # "raw" (array) or "jpeg" (bytes per frame; uint8 images only)
    scale: float = 1.0  # stored = round(value * scale) for integer dtypes, value for float dtypes
    compression: str | None = None  # h5py filter for raw fields: None, "lzf" or "gzip"
    quality: int | None = None  # JPEG quality
    subsampling: str = "444"  # JPEG chroma subsampling: "444" keeps every channel sharp (flow images need it)
    frames_offset: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.encoding not in ("raw", "jpeg"):
            raise ValueError(f"unknown encoding {self.encoding!r} for field {self.name!r}")
        if self.encoding == "jpeg" and (self.dtype != "uint8" or self.channels != 3):
            raise ValueError(f"field {self.name!r}: JPEG stores 3-channel uint8 images only")


@dataclass(frozen=True)
class Schema:
    """What a stage writes. Stored once in ``dataset.json`` and in every shard; compared on every resume."""

    kind: str  # "flow" (extract-flow) or "train" (build-rgbf)
    height: int
    width: int
    fields: tuple[FieldSpec, ...]
    config: dict[str, Any] = field(default_factory=dict)  # the stage configuration that made the data
    version: int = FORMAT_VERSION

    def field(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise StoreError(f"this data holds no {name!r} (it holds: {', '.join(self.field_names)})")

    @property
    def field_names(self) -> list[str]:
        return [spec.name for spec in self.fields]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schema":
        data = dict(data)
        data["fields"] = tuple(FieldSpec(**f) for f in data["fields"])
        return cls(**data)


def library_versions() -> dict[str, str]:
    """Versions recorded with the data, so a shard says what made it."""
    import cv2  # imported here: reading shards must not need OpenCV's import cost up front

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "opencv": cv2.__version__,
        "asym3d_format": str(FORMAT_VERSION),
    }


# ---------------------------------------------------------------------------------------------------------------
# Output directory set-up: refuse to mix configurations


def prepare_output(root: Path, schema: Schema, dataset: dict[str, Any], plan: list[list[str]],
                   *, overwrite: bool = False, recorded: dict[str, Any] | None = None,
                   repair: bool = False) -> list[str]:
    """Create ``root`` for a run, or check that it continues an earlier run of the same configuration.

    ``dataset`` holds what the data is about (kind, classes, relabel mappings); ``plan`` the video ids per shard.
    A different schema or plan in an existing directory raises :class:`StoreError` naming the difference, unless
    ``overwrite``, which deletes the earlier shards first (never silently). ``overwrite`` with the same configuration
    deletes nothing: the shards are what the rerun would write. Shards without a ``dataset.json`` (deleted by hand)
    are checked against their own stored schema before anything is added. ``recorded`` (what runs this time:
    ``libraries``, backend, limits) is stored, not compared; returns warnings naming changed library versions.

    A damaged ``dataset.json`` (it fails its checksum) is refused in one line, or with ``repair`` rebuilt: kept as
    ``dataset.json.damaged`` and written anew from this run's declaration, once that agrees with what the shards
    themselves hold (their schema, each video's shard in the plan, each video's label and class name).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(root, exc) from None
    meta_path = root / SCHEMA_FILE
    new = as_json({"schema": schema.to_dict(), "dataset": dataset, "plan": plan, "recorded": recorded or {}})
    identity = {key: new[key] for key in ("schema", "dataset", "plan")}
    old, sealed = None, False
    if meta_path.exists():
        try:
            old, sealed = read_json_sealed(meta_path, SCHEMA_KEYS)
        except DamagedError as exc:
            if not repair:
                raise
            diff = _orphan_shard_differences(root, new, skip_damaged=True)
            if diff:
                raise other_configuration(root, diff, f"{meta_path} is damaged ({exc}) and this run declares "
                                                      "another configuration than the shards hold, so it cannot be "
                                                      "rebuilt from it") from None
            try:
                os.replace(meta_path, meta_path.with_name(SCHEMA_FILE + ".damaged"))
            except OSError as err:
                raise write_error(meta_path, err) from None
    if old is not None:
        diff = configuration_differences({key: old.get(key) for key in identity}, identity)
    else:
        diff = _orphan_shard_differences(root, new)
    if not diff:
        warnings: list[str] = []
        if old is not None:
            before = (old.get("recorded") or {}).get("libraries", {})
            now = new["recorded"].get("libraries", {})
            changed = [f"{name} {before[name]} -> {now[name]}" for name in sorted(set(before) & set(now))
                       if before[name] != now[name]]
            if changed:
                warnings.append(f"{root}: library versions changed since the earlier run ({', '.join(changed)}); "
                                "each shard records the versions that made it")
        if old is None or not sealed or old.get("recorded") != new["recorded"]:  # a finished rerun writes nothing
            write_json_sealed(meta_path, new)
        return warnings
    if not overwrite:
        raise other_configuration(root, diff, "use another output directory or --overwrite")
    for path in root.glob(SHARD_GLOB):
        path.unlink()
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    write_json_sealed(meta_path, new)
    return []


def _orphan_shard_differences(root: Path, declared: dict[str, Any], skip_damaged: bool = False) -> list[str]:
    """Differences between a declared identity (``schema``, ``dataset``, ``plan``) and what each shard of a
    directory without a (usable) dataset.json holds: its stored schema, and for each video its place in the plan,
    its label and class name. ``skip_damaged`` passes over shards that cannot be read (``--repair`` sets them aside
    next)."""
    classes, plan = declared["dataset"].get("classes", []), declared["plan"]
    for path in sorted(root.glob(SHARD_GLOB)):
        try:
            with h5py.File(path, "r") as f:
                stored = json.loads(f.attrs["asym3d_schema"])
                index = int(f.attrs["asym3d_shard"])
                videos = video_entries(f, path.name)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            if skip_damaged:
                continue
            return [f"{path.name} unreadable ({os_reason(exc)})"]
        diff = [f"{path.name}: {d}" for d in configuration_differences({"schema": stored},
                                                                       {"schema": declared["schema"]})]
        planned = set(plan[index]) if 0 <= index < len(plan) else set()
        for video in videos:
            if video.video_id not in planned:
                diff.append(f"{path.name}: video {video.video_id!r} is not in the plan's shard {index}")
            elif not 0 <= video.label < len(classes) or classes[video.label] != video.label_name:
                diff.append(f"{path.name}: video {video.video_id!r} has class {video.label} {video.label_name!r}, "
                            f"not in the classes declared")
        if diff:
            return diff
    return []


def as_json(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (tuples become lists, int keys strings), so what a run declares
    compares equal to what an earlier run stored."""
    return json.loads(json.dumps(value))


def configuration_differences(stored: Any, declared: Any) -> list[str]:
    """Where an output's stored identity differs from the one this run declares, one readable entry each (empty
    when they are the same). ``declared`` is normalised with :func:`as_json`; ``stored`` is read from JSON.

    The one check behind every "this output was made with another configuration" refusal (stage directories,
    shards, verification, reports, demo data): see :func:`other_configuration` for the message."""
    return _differences(stored, as_json(declared))


def other_configuration(where: Path | str, differences: list[str], remedy: str,
                        error: type[Asym3dError] | None = None) -> Asym3dError:
    """The one-line refusal of an output made with another configuration: where, the first differences, what to do
    (``error`` is the caller's error class, :class:`StoreError` by default)."""
    return (error or StoreError)(f"{where}: holds output of a different configuration "
                                 f"({'; '.join(differences[:5])}); {remedy}")


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable list of where two JSON documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else key
            if key not in old or key not in new:
                out.append(f"{sub} only in {'new' if key in new else 'existing'} run")
            else:
                out.extend(_differences(old[key], new[key], sub))
        return out
    if old != new:
        if isinstance(old, list) and isinstance(new, list) and len(old) > 8:
            return [f"{path} differs"]
        return [f"{path}: existing {old!r} vs requested {new!r}"]
    return []


def load_dataset_meta(root: Path) -> dict[str, Any]:
    """The ``dataset.json`` of a stage output, checked against its checksum, with a clear error when the directory
    is not one."""
    return read_dataset_meta(root)[0]


def read_dataset_meta(root: Path) -> tuple[dict[str, Any], bool]:
    """:func:`load_dataset_meta`, and whether the file carried its checksum (one written before them did not)."""
    meta_path = Path(root) / SCHEMA_FILE
    if not meta_path.is_file():
        raise StoreError(f"{root}: not an asym3d shard directory (no {SCHEMA_FILE})")
    meta, sealed = read_json_sealed(meta_path, SCHEMA_KEYS)
    schema = meta.get("schema")
    if not isinstance(schema, dict):
        raise DamagedError(f"{meta_path}: unreadable (no schema in it)")
    version = schema.get("version")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{meta_path}: format version {version}, this asym3d reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    return meta, sealed


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class VideoMeta:
    video_id: str
    label: int
    label_name: str
    source: str = ""
    splits: dict[int, str] = field(default_factory=dict)


class ShardWriter:
    """Write one shard atomically: ``with ShardWriter(path, schema, index) as w: w.add_video(...)``.

    The file is built under a temporary name (:func:`atomic_output`) and renamed onto ``path`` only when the ``with``
    block ends without an exception, so a killed process never leaves a file that looks complete. ``recorded``
    (library versions, backend) is stored beside the schema and never compared.

    HDF5 crashes the process (segmentation fault) when a write fails inside a cache flush it does while closing
    objects, which is where a full disk shows up by default. So the chunk cache is off (each video's arrays are
    written whole, the cache bought nothing) and the file is flushed after every video: a full disk then fails a
    normal call, the file closes cleanly, and the caller gets a one-line :class:`StoreError`.
    """

    def __init__(self, path: Path, schema: Schema, shard_index: int, recorded: dict[str, Any] | None = None):
        self.path = Path(path)
        self.schema = schema
        self._output = atomic_output(self.path)  # entered and left by hand: it spans this writer's own with-block
        self.tmp = self._output.__enter__()
        self._file: h5py.File | None = None
        self._failures: list[dict[str, str]] = []
        try:
            self._file = h5py.File(self.tmp, "w", rdcc_nbytes=0)
            self._file.attrs["asym3d_schema"] = json.dumps(schema.to_dict())
            self._file.attrs["asym3d_recorded"] = json.dumps(recorded or {})
            self._file.attrs["asym3d_shard"] = shard_index
            self._videos = self._file.create_group("videos")
            self._file.flush()
        except BaseException as exc:
            self._close(exc)
            raise

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            try:
                self._file.attrs["failures"] = json.dumps(self._failures)
                seal_shard(self._file)
            except OSError as err:
                exc = err
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        """Close the HDF5 file, then let :func:`atomic_output` rename the temporary file (no error) or delete it
        (raising a one-line :class:`StoreError` when the error was the operating system's).

        A full disk can fail HDF5's flush, which h5py raises as ``RuntimeError`` carrying the errno; that counts as
        the operating system's error. The close after it then fails too ("Can't destroy cache"), with the file
        still open: that second error is dropped in favour of the first, and the file is discarded anyway."""
        exc = hdf5_io_error(exc) or exc if exc is not None else None
        try:
            if self._file is not None:
                self._file.close()
        except (OSError, RuntimeError) as err:
            if exc is None and not isinstance(err, OSError) and hdf5_io_error(err) is None:
                raise  # a close that fails on its own, not after a write error: a bug, keep its traceback
            exc = exc or hdf5_io_error(err) or err
        if exc is None:
            self._output.__exit__(None, None, None)
        else:
            self._output.__exit__(type(exc), exc, exc.__traceback__)

    def add_failure(self, video_id: str, source: str, reason: str) -> None:
        self._failures.append({"video_id": video_id, "path": source, "reason": reason})

    @property
    def failures(self) -> tuple[dict[str, str], ...]:
        """The failures recorded so far, as they will be stored in the shard."""
        return tuple(self._failures)

    def copy_video(self, source: h5py.File, key: str) -> None:
        """Copy a finished video from an earlier shard of the same schema byte for byte (no recomputation). Its
        metadata checksum is checked first (when it has one): the new shard's seal must not bless damage."""
        group = source["videos"][key]
        attributes = _attributes(group)
        if DIGEST_ATTR in attributes and attributes[DIGEST_ATTR] != content_digest(_checked(attributes)):
            raise damaged_shard(source.filename, ValueError(f"video {attributes.get('video_id')!r}: metadata fails "
                                                            "its checksum"))
        source.copy(group, self._videos, name=f"{len(self._videos):04d}")
        self._file.flush()

    def add_video(self, meta: VideoMeta, arrays: dict[str, np.ndarray | JpegFrames]) -> None:
        """Store one video. ``arrays`` maps each schema field to its decoded values ((T, H, W, C)), or a JPEG
        field to its frames already encoded."""
        missing = set(self.schema.field_names) - set(arrays)
        if missing:
            raise ValueError(f"{meta.video_id}: no data for fields {sorted(missing)}")
        group = self._videos.create_group(f"{len(self._videos):04d}")
        n_frames = None
        for spec in self.schema.fields:
            values = arrays[spec.name]
            _write_field(group, spec, values)
            if spec.frames_offset == 0:
                n_frames = len(values)
        if n_frames is None:  # only offset fields: derive the video's frame count from the first
            n_frames = len(arrays[self.schema.fields[0].name]) - self.schema.fields[0].frames_offset
        group.attrs.update(video_id=meta.video_id, label=meta.label, label_name=meta.label_name,
                           source=meta.source, n_frames=n_frames,
                           splits=json.dumps({str(k): v for k, v in meta.splits.items()}))
        self._file.flush()


class JpegFrames(list):
    """A JPEG field's frames already encoded (:func:`encode_jpeg`), in order: a stage that computes a video in steps
    encodes each step as it goes instead of holding the whole video's images."""


def encode_jpeg(spec: FieldSpec, frames: np.ndarray) -> JpegFrames:
    """``(N, H, W, 3)`` uint8 frames as a JPEG field stores them."""
    import simplejpeg

    return JpegFrames(np.frombuffer(simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=spec.quality or 90,
                                                           colorspace="RGB", colorsubsampling=spec.subsampling),
                                    np.uint8) for frame in frames)


def _write_field(group: h5py.Group, spec: FieldSpec, values: np.ndarray | JpegFrames) -> None:
    if spec.encoding == "jpeg" and isinstance(values, JpegFrames):
        encoded = values
    else:
        if values.ndim != 4 or values.shape[-1:] != (spec.channels,):
            raise ValueError(f"field {spec.name!r}: expected (T, H, W, {spec.channels}), got {values.shape}")
        encoded = encode_jpeg(spec, values) if spec.encoding == "jpeg" else None
    if encoded is not None:
        frames = np.empty(len(encoded), dtype=object)  # one write for the whole field, not one per frame
        for i, frame in enumerate(encoded):
            frames[i] = frame
        group.create_dataset(spec.name, data=frames, dtype=h5py.vlen_dtype(np.uint8))
        group.create_dataset(spec.name + CRC_SUFFIX, data=np.array([frame_crc(f) for f in encoded], np.uint32),
                             chunks=(max(len(encoded), 1),), fletcher32=True)
        return
    stored = encode_values(spec, values)
    chunks = (1,) + stored.shape[1:] if len(stored) else None
    group.create_dataset(spec.name, data=stored, chunks=chunks, compression=spec.compression,
                         fletcher32=bool(len(stored)))


def encode_values(spec: FieldSpec, values: np.ndarray) -> np.ndarray:
    """A raw field's values as stored: ``rint(value * scale)`` clipped to an integer dtype, else the dtype."""
    dtype = np.dtype(spec.dtype)
    if np.issubdtype(dtype, np.integer) and spec.scale != 1.0:
        info = np.iinfo(dtype)
        return np.clip(np.rint(values * spec.scale), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def stored_values(spec: FieldSpec, values: np.ndarray) -> np.ndarray:
    """``values`` as a reader of the field ``spec`` gets them back (JPEG-encoded and decoded, or at the precision a
    raw field stores them): what a later stage, or predict, sees, computed without writing it.

    Finite float32 values of an int8/int16 field take a shortcut with the same result in a third of the time: every
    integer of those dtypes is exact in float32, so ``rint(v * scale)`` clipped to the dtype's range and divided by
    ``scale`` skips the round trip through the integer array. Anything else (NaN, whose integer cast is undefined)
    takes the round trip."""
    if spec.encoding == "jpeg":
        return decode_field(spec, encode_jpeg(spec, values))
    dtype = np.dtype(spec.dtype)
    if (np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2 and spec.scale != 1.0
            and values.dtype == np.float32 and np.isfinite(values).all()):
        info = np.iinfo(dtype)
        out = values * np.float32(spec.scale)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
        out /= np.float32(spec.scale)
        return out
    return decode_field(spec, encode_values(spec, values))


def frame_crc(encoded: np.ndarray) -> int:
    """CRC-32 of one stored JPEG frame's bytes (HDF5 checksums cannot cover variable-length data)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(encoded, np.uint8)))


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class VideoEntry:
    video_id: str
    label: int
    label_name: str
    n_frames: int
    shard: str
    key: str
    source: str
    splits: dict[int, str]


def video_entries(f: h5py.File, shard: str) -> list[VideoEntry]:
    """The videos of one open shard named ``shard``, from their attributes, checked against their checksums
    (KeyError, ValueError when damaged)."""
    attributes, groups = read_metadata(f)
    _, damage = metadata_damage(attributes, groups)
    if damage:
        video_id, reason = damage[0]
        raise ValueError(f"video {video_id!r}: {reason}" if video_id else reason)
    videos = []
    for key, a in groups:
        videos.append(VideoEntry(
            video_id=str(a["video_id"]), label=int(a["label"]), label_name=str(a["label_name"]),
            n_frames=int(a["n_frames"]), shard=shard, key=key, source=str(a["source"]),
            splits={int(k): v for k, v in json.loads(a["splits"]).items()}))
    return videos


class ShardSet:
    """Read-only view of a stage output directory, shared by the trainer, the evaluator and users.

    HDF5 handles are opened lazily and dropped when pickled, so a ShardSet can be handed to DataLoader workers or
    dask tasks: each process opens its own files.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such directory")
        meta = load_dataset_meta(self.root)
        try:
            self.schema = Schema.from_dict(meta["schema"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedError(f"{self.root / SCHEMA_FILE}: unreadable schema ({exc})") from None
        self.dataset: dict[str, Any] = meta.get("dataset", {})
        self.plan: list[list[str]] = meta.get("plan", [])
        self.last_run: dict[str, Any] = meta.get("recorded") or {}  # what the latest run into the directory recorded
        self.videos: list[VideoEntry] = []
        self.failures: list[dict[str, str]] = []
        self.complete_shards: list[str] = []
        self.recorded: dict[str, dict[str, Any]] = {}  # shard name -> what ran (library versions, backend)
        for path in sorted(self.root.glob(SHARD_GLOB)):
            videos, failures, recorded = self._read_index(path)
            self.complete_shards.append(path.name)
            self.recorded[path.name] = recorded
            self.videos.extend(videos)
            self.failures.extend(failures)
        self._by_id = {v.video_id: v for v in self.videos}
        self._files: dict[str, h5py.File] = {}

    def _read_index(self, path: Path) -> tuple[list[VideoEntry], list[dict[str, str]], dict[str, Any]]:
        """One shard's videos, failures and what ran (``asym3d_recorded``); a shard that cannot be opened or parsed
        is a one-line DamagedError."""
        try:
            with h5py.File(path, "r") as f:
                self._check_shard_schema(path, f)
                recorded = json.loads(f.attrs.get("asym3d_recorded", "{}"))
                failures = json.loads(f.attrs.get("failures", "[]"))
                return video_entries(f, path.name), failures, recorded
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise damaged_shard(path, exc) from None

    def _check_shard_schema(self, path: Path, f: h5py.File) -> None:
        raw = f.attrs.get("asym3d_schema")
        if raw is None:
            raise StoreError(f"{path}: not an asym3d shard (no schema attribute)")
        stored = json.loads(raw)
        if stored.get("version") not in READABLE_VERSIONS:
            raise StoreError(f"{path}: format version {stored.get('version')}, "
                             f"this asym3d reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        diff = configuration_differences(stored, self.schema.to_dict())
        if diff:
            raise other_configuration(path, diff, f"a shard of another run than {self.root / SCHEMA_FILE} declares")

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.get("classes", []))

    def __len__(self) -> int:
        return len(self.videos)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._by_id

    def video(self, video_id: str) -> VideoEntry:
        try:
            return self._by_id[video_id]
        except KeyError:
            raise StoreError(f"{self.root}: no video {video_id!r}") from None

    def split_videos(self, split: int, subset: str) -> list[VideoEntry]:
        """Videos stored here that the dataset puts in ``subset`` ("train"/"test") of split ``split``."""
        return [v for v in self.videos if v.splits.get(split) == subset]

    def field_length(self, video: VideoEntry, name: str) -> int:
        return video.n_frames + self.schema.field(name).frames_offset

    def read(self, video_id: str | VideoEntry, name: str, start: int = 0, stop: int | None = None,
             index: Iterable[int] | None = None) -> np.ndarray:
        """Frames ``start:stop`` (or the listed frame ``index``) of one field of one video.

        Images come back as uint8 ``(n, H, W, C)``; scaled integer or float fields as float32.
        """
        video = video_id if isinstance(video_id, VideoEntry) else self.video(video_id)
        spec = self.schema.field(name)
        where = f"{self.root / video.shard}: video {video.video_id!r}, field {name!r}"
        handle = self._handle(video.shard)  # a shard that does not open names itself
        try:
            raw = read_checked(handle["videos"][video.key], spec, start, stop, index,
                               checksums=self.schema.version >= 2)
        except (OSError, KeyError) as exc:
            raise DamagedError(f"{where}: {os_reason(exc)}") from None
        except DamagedError as exc:
            raise DamagedError(f"{where}: {exc}") from None
        try:
            return decode_field(spec, raw)
        except ValueError as exc:  # simplejpeg: a frame that passed its CRC yet does not decode
            raise DamagedError(f"{where}: {exc}") from None

    def _handle(self, shard: str) -> h5py.File:
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open_shard(self.root / shard)
        return handle

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # h5py handles never cross process boundaries
        return state

    def __iter__(self) -> Iterator[VideoEntry]:
        return iter(self.videos)


def open_shard(path: Path | str) -> h5py.File:
    """Open a finished shard for reading; one that HDF5 cannot open is a one-line :class:`DamagedError`."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise damaged_shard(path, exc) from None


def read_checked(group: h5py.Group, spec: FieldSpec, start: int = 0, stop: int | None = None,
                 index: Iterable[int] | None = None, *, checksums: bool = True) -> Any:
    """Stored values of one field of one video group (frames ``start:stop`` or ``index``), checksums checked.

    Raw arrays: h5py raises OSError when a chunk fails its fletcher32 checksum. JPEG frames: each frame's CRC-32 is
    compared here; a mismatch raises :class:`DamagedError` naming the frame. ``checksums=False`` reads format
    version 1 shards, which have none.
    """
    ds = group[spec.name]
    if index is not None:
        idx = np.asarray(list(index), dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)  # h5py needs increasing indices
        raw = ds[uniq.tolist()]
        frames = uniq
        raw = raw[inverse] if spec.encoding == "raw" else [raw[i] for i in inverse]
        order = inverse
    else:
        raw = ds[start:stop]
        frames = np.arange(len(ds))[start:stop]
        order = np.arange(len(frames))
    if spec.encoding == "jpeg" and checksums:
        crcs = group[spec.name + CRC_SUFFIX][frames.tolist()] if len(frames) else []
        for position, i in enumerate(order):
            if frame_crc(raw[position]) != crcs[i]:
                raise DamagedError(f"frame {int(frames[i])} fails its CRC-32 checksum")
    return raw


def decode_field(spec: FieldSpec, raw: Any) -> np.ndarray:
    """Stored values (as h5py returns them) to the values the schema declares."""
    if spec.encoding == "jpeg":
        import simplejpeg

        if len(raw) == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        first = simplejpeg.decode_jpeg(raw[0], colorspace="RGB")
        out = np.empty((len(raw),) + first.shape, np.uint8)  # decode in place: no per-frame copies
        out[0] = first
        for i in range(1, len(raw)):
            simplejpeg.decode_jpeg(raw[i], colorspace="RGB", buffer=out[i])
        return out
    raw = np.asarray(raw)
    if spec.dtype == "uint8":
        return raw
    values = raw.astype(np.float32)
    if spec.scale != 1.0 and np.issubdtype(np.dtype(spec.dtype), np.integer):
        values /= spec.scale
    return values


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def write_manifest(root: Path) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from the shards on disk; returns it. Planned videos not yet written are pending."""
    shards = ShardSet(root)
    shards.close()
    where = {vid: i for i, ids in enumerate(shards.plan) for vid in ids}
    entries = [{"video_id": v.video_id, "shard": v.shard, "n_frames": v.n_frames, "label": v.label,
                "label_name": v.label_name, "status": "ok"} for v in shards.videos]
    entries += [{"video_id": f["video_id"], "shard": shard_name(where.get(f["video_id"], -1)),
                 "path": f["path"], "status": "failed", "reason": f["reason"]} for f in shards.failures]
    done = {e["video_id"] for e in entries}
    pending = [vid for ids in shards.plan for vid in ids if vid not in done]
    manifest = {
        "schema": shards.schema.to_dict(),
        "summary": {"videos_ok": len(shards.videos), "videos_failed": len(shards.failures),
                    "videos_pending": len(pending), "frames": sum(v.n_frames for v in shards.videos),
                    "shards_complete": len(shards.complete_shards), "shards_planned": len(shards.plan)},
        "videos": entries,
        "pending": pending,
    }
    write_json_sealed(Path(root) / MANIFEST_FILE, manifest)
    return manifest
