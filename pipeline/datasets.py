"""Dataset indexing: turn a video tree plus its split/label files into one list of labelled video records.

Every later stage (decode, flow, shards, training, evaluation) reads a :class:`DatasetIndex`, so this module is the
only place that knows the on-disk conventions of each dataset. One small parser per layout:

- ``ucf101``: ``<root>/<Class>/v_<Class>_gXX_cYY.avi`` with the official ``classInd.txt``, ``trainlist0N.txt`` and
  ``testlist0N.txt`` (CRLF line endings are fine). Records are the union of all split lists.
- ``hmdb51``: ``<root>/<class>/<video>.avi`` with the official ``<class>_test_splitN.txt`` files
  (``<video>.avi <0|1|2>``: 1 train, 2 test, 0 unused in that split). Records are every video the files name,
  including the ones unused in all three splits (they keep ``splits == {}``).
- ``fcvid``: videos plus the user's labels file; categories are filtered by a keep/drop file
  (``pipeline/data/fcvid_motion_categories.tsv`` by default) and kept ones relabelled ``0..K-1``.
- ``kinetics``: Kinetics-400/600/700 from the official annotation CSVs (``label,youtube_id,time_start,time_end,
  split``; ``train.csv`` is split 1's train, ``validate.csv`` or ``val.csv`` its test) over a downloaded tree: a clip
  ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under the root (``<split>/<label>/``, the flat
  ``<split>/`` variant, or other nesting). A share of Kinetics is always missing (deleted YouTube videos): pass
  ``--max-missing`` above it.
- ``folder``: any ``<root>/<class>/<video>`` tree, for users' own data and for tests.

Error policy (the CLI repeats it in ``--help``):

- A malformed line, an unknown class or category, a label that contradicts the class list, an absolute path or
  one with ``..``, or a video put in both train and test of one split raises :class:`DatasetError` naming
  ``file:line``. A wrong split file is a user error; failing fast beats training on a silently wrong split.
- A video or class directory that is a symbolic link leading outside the dataset root is indexed with
  ``VideoRecord.refused`` set: extract-flow fails that video with the reason (recorded in its shard, like a video
  that does not decode) and goes on; nothing outside the root is read.
- A line naming a video that is missing on disk is skipped with a warning naming ``file:line`` (one warning per
  video, at its first line; a few missing downloads should not block a run). If more than ``max_missing`` (default
  half) of the videos a split names are missing, the root is almost certainly wrong and :class:`DatasetError` is
  raised instead; ``max_missing=1`` accepts a partial download. A listed ``a.avi`` absent on disk matches ``a.mp4``
  (any video extension) beside it: re-encoded copies of HMDB-51 and UCF-101 keep the stem (one warning in all).
- ``classes`` restricts the index to those classes of the official list (a few classes before a full run): lines
  of other classes are skipped, labels are ``0..K-1`` in official order and ``extra["official_labels"]`` maps each
  kept class to its label in the full list.
- An empty split file, an HMDB-51 file without test videos, and folder entries named like videos that are not
  files (directories, broken or looping links) are warnings; an unreadable directory is a :class:`DatasetError`.
- ``check_files=False`` skips the disk check, to index split files without the videos.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pipeline.errors import Asym3dError

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
SUBSETS = ("train", "test")
DEFAULT_FCVID_KEEP_FILE = "fcvid_motion_categories.tsv"
# A split whose share of missing videos exceeds this points at a wrong --root, not at a few failed downloads.
MAX_MISSING_FRACTION = 0.5

_UCF_GROUP = re.compile(r"_(g\d+)_c\d+$")
_SPLIT_LIST = re.compile(r"^(train|test)list(\d+)\.txt$")
_HMDB_SPLIT = re.compile(r"^(.+)_test_split(\d+)\.txt$")
_HMDB_SUBSET = {"0": None, "1": "train", "2": "test"}


class DatasetError(Asym3dError, ValueError):
    """A dataset, split or label file is unusable; the message names the file (and line) and the reason."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a dataset.

    ``video_id`` is the path relative to the root without its extension (``<class>/<stem>`` for UCF-101, HMDB-51
    and folder trees); it is unique in the dataset and stable across runs, so shards and manifests key on it.
    ``splits`` maps split number to ``"train"`` or ``"test"``; a video unused in a split is absent from it.
    """

    video_id: str
    path: Path
    label: int
    label_name: str
    group: str | None
    splits: dict[int, str]
    refused: str = ""  # why this video is not read (a link leading outside the root); empty when it is fine


@dataclass
class DatasetIndex:
    """The indexed dataset: ``classes[label]`` is the class name; ``warnings`` lists skipped lines (``file:line:
    reason``); ``extra`` carries adapter-specific facts to store with the output (FCVID's relabel mapping, the
    official labels of a class subset); ``missing`` maps each split to (videos missing on disk, videos listed)."""

    kind: str
    root: Path
    classes: list[str]
    records: list[VideoRecord]
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    missing: dict[int, tuple[int, int]] = field(default_factory=dict)

    def split(self, split: int, subset: str) -> list[VideoRecord]:
        """The records of one subset (``"train"``/``"test"``) of one split, in index order."""
        return [r for r in self.records if r.splits.get(split) == subset]


# ---------------------------------------------------------------------------------------------------- file helpers


def _read_rows(path: Path, delimiter: str | None = None, comments: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Yield ``("file:line", fields)`` for each non-blank line, fields split on ``delimiter`` (CSV quoting rules)
    or on whitespace. CRLF and LF both work. ``comments`` skips ``#`` lines; only our own keep file has them
    (HMDB-51 video names can start with ``#``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or (comments and line.startswith("#")):
            continue
        fields = next(csv.reader([line], delimiter=delimiter)) if delimiter else line.split()
        yield f"{path}:{number}", [f.strip() for f in fields]


def _delimiter_for(path: Path) -> str | None:
    """Users' label files: ``.csv`` is comma-separated, ``.tsv`` tab-separated, anything else whitespace."""
    return {".csv": ",", ".tsv": "\t"}.get(path.suffix.lower())


def _parse_int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{where}: {what} must be an integer, got {text!r}") from None


def _resolve_inside(root: Path, relative: str, where: str) -> tuple[Path, str]:
    """Resolve a path read from a split/label file inside ``root`` (itself already resolved), as ``(path, refused)``,
    so an untrusted list cannot make later stages read arbitrary files. Absolute paths and ``..`` are a malformed
    line (:class:`DatasetError`); a symlink (the video's or its class directory's) leading out of the root refuses
    that one video: ``path`` is then the link itself and ``refused`` the reason, so the video fails with it and the
    rest of the run goes on. ``os.path`` rather than ``pathlib`` because this runs for every line of every split
    file."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or not relative:
        raise DatasetError(f"{where}: path {relative!r} must be relative to the dataset root without '..'")
    link = os.path.join(root, relative)
    resolved = os.path.realpath(link)
    if not resolved.startswith(os.path.join(root, "")):
        return Path(os.path.normpath(link)), f"a symbolic link to {resolved}, outside the dataset root {root}; not read"
    return Path(resolved), ""


def _class_and_name(relative: str, where: str) -> tuple[str, str]:
    """Split ``<class>/<video>``, the path form of UCF-101 style split lists."""
    parts = relative.split("/")
    if len(parts) != 2 or not all(parts):
        raise DatasetError(f"{where}: expected '<class>/<video>', got {relative!r}")
    return parts[0], parts[1]


# ------------------------------------------------------------------------------------------------ record collection


@dataclass
class _Entry:
    path: Path
    label: int
    group: str | None
    splits: dict[int, str] = field(default_factory=dict)
    refused: str = ""


class _Collector:
    """Accumulates split/label lines into records and applies the shared policy: label conflicts and train/test
    clashes are errors, missing videos are warnings, and a split with too many missing videos is an error."""

    def __init__(self, kind: str, root: Path, classes: list[str], check_files: bool,
                 max_missing: float = MAX_MISSING_FRACTION) -> None:
        self.kind, self.root, self.classes, self.check_files = kind, root, classes, check_files
        self.max_missing = max_missing
        self.other_extension: list[tuple[str, Path]] = []  # (listed name, file found under another extension)
        self.parse_groups = kind in ("ucf101", "folder")  # UCF-101 style names carry the gXX recording group
        self.entries: dict[str, _Entry] = {}
        self.warnings: list[str] = []
        self.named: dict[int, int] = {}  # split -> lines naming a video
        self.missing: dict[int, int] = {}  # split -> of those, videos missing on disk
        # relative path -> (resolved path, exists, refused): UCF-101 names every video once per split, and resolving
        # and stat-ing paths is most of the indexing time
        self._located: dict[str, tuple[Path, bool, str]] = {}

    def add(self, where: str, relative: str, label: int, split: int, subset: str | None) -> None:
        """Record that ``relative`` (class ``label``) is in ``subset`` of ``split`` (None: listed but unused).
        A missing video is warned about once, at its first line, and counted in every split that names it."""
        first_mention = relative not in self._located
        if first_mention:
            path, refused = _resolve_inside(self.root, relative, where)
            self._located[relative] = (*self._locate(path, relative), refused)
        path, exists, refused = self._located[relative]
        self.named[split] = self.named.get(split, 0) + 1
        if not exists:
            self.missing[split] = self.missing.get(split, 0) + 1
            if first_mention:
                self.warnings.append(f"{where}: video not found, skipped: {path}")
            return
        video_id = os.path.splitext(os.path.normpath(relative))[0]  # normpath: "./a/b.mp4" and "a/b.mp4" are one
        entry = self.entries.get(video_id)
        if entry is None:
            match = _UCF_GROUP.search(video_id) if self.parse_groups else None
            entry = self.entries[video_id] = _Entry(path, label, match.group(1) if match else None, refused=refused)
        if entry.path != path:
            raise DatasetError(f"{where}: {relative} and {entry.path.name} would both get the id {video_id!r}")
        if entry.label != label:
            raise DatasetError(f"{where}: {relative} has label {self.classes[label]!r} here but "
                               f"{self.classes[entry.label]!r} on an earlier line")
        if subset is not None:
            previous = entry.splits.setdefault(split, subset)
            if previous != subset:
                raise DatasetError(f"{where}: {relative} is in both train and test of split {split}")

    def _locate(self, path: Path, relative: str) -> tuple[Path, bool]:
        """``(path, exists)`` of a listed video; a missing ``a.avi`` becomes an existing ``a.mp4`` (or any other
        video extension) beside it, since re-encoded copies of the datasets keep the official stems."""
        if not self.check_files or path.is_file():
            return path, True
        for extension in VIDEO_EXTENSIONS:
            other = path.with_suffix(extension)
            if other != path and other.is_file():
                self.other_extension.append((relative, other))
                return other, True
        return path, False

    def rows(self, path: Path, delimiter: str | None = None) -> list[tuple[str, list[str]]]:
        """The rows of a split or label file; an empty file is a warning (it silently meant "no videos")."""
        rows = list(_read_rows(path, delimiter))
        if not rows:
            self.warnings.append(f"{path}: empty file, no videos listed")
        return rows

    def finish(self, sources: str, extra: dict | None = None) -> DatasetIndex:
        """Check the missing-video share per split and build the index (records sorted by label, then id)."""
        for split, named in sorted(self.named.items()):
            missing = self.missing.get(split, 0)
            if missing > self.max_missing * named:
                raise DatasetError(f"{sources}: {missing} of {named} videos of split {split} are missing under "
                                   f"{self.root} (more than --max-missing {self.max_missing:g}); is the dataset "
                                   "root right? For a partial download pass --max-missing 1")
        if not self.entries:
            raise DatasetError(f"{sources}: no videos listed")
        if self.other_extension:
            listed, found = self.other_extension[0]
            self.warnings.insert(0, f"{self.root}: {len(self.other_extension)} listed videos found under another "
                                    f"extension (e.g. {listed} -> {found.name})")  # first: the CLI shows ten
        records = [VideoRecord(vid, e.path, e.label, self.classes[e.label], e.group, dict(sorted(e.splits.items())),
                               e.refused)
                   for vid, e in sorted(self.entries.items(), key=lambda item: (item[1].label, item[0]))]
        missing = {split: (self.missing.get(split, 0), named) for split, named in sorted(self.named.items())}
        return DatasetIndex(self.kind, self.root, self.classes, records, self.warnings, extra or {}, missing)


# ------------------------------------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class _Inputs:
    root: Path
    check_files: bool
    splits_dir: Path | None
    labels_file: Path | None
    categories_file: Path | None
    keep_file: Path | None
    classes: tuple[str, ...] | None
    max_missing: float


def _select_classes(official: list[str], wanted: tuple[str, ...] | None, source: str) -> tuple[list[str], dict]:
    """The classes to index, in official order, and the ``extra`` entry recording a subset's official labels.

    ``wanted`` None keeps every class. A name not in the official list is an error (a typo would otherwise index
    nothing of that class)."""
    if wanted is None:
        return list(official), {}
    unknown = [name for name in wanted if name not in official]
    if unknown:
        raise DatasetError(f"{source}: unknown class {unknown[0]!r} in --classes ({len(official)} classes, e.g. "
                           f"{', '.join(official[:3])})")
    kept = [name for name in official if name in set(wanted)]
    return kept, {"official_labels": {name: official.index(name) for name in kept}, "official_classes": len(official)}


def _split_lists(splits_dir: Path) -> dict[int, dict[str, Path]]:
    """Find ``trainlist0N.txt`` / ``testlist0N.txt`` pairs: ``{N: {"train": path, "test": path}}``."""
    found: dict[int, dict[str, Path]] = {}
    for path in sorted(splits_dir.iterdir()):
        if match := _SPLIT_LIST.match(path.name):
            found.setdefault(int(match.group(2)), {})[match.group(1)] = path
    if not found:
        raise DatasetError(f"{splits_dir}: no trainlistNN.txt / testlistNN.txt split files")
    for split, files in found.items():
        for subset in SUBSETS:
            if subset not in files:
                raise DatasetError(f"{splits_dir}: split {split} has no {subset}list{split:02d}.txt")
    return found


def _collect_split_lists(collector: _Collector, splits_dir: Path, official: list[str], extra: dict) -> DatasetIndex:
    """Read UCF-101 style lists: ``<class>/<video> [<1-based class index>]``. The class comes from the path; an
    index column, where present (UCF-101 trainlists), must agree with its place in ``official``. Lines of classes
    outside ``collector.classes`` (a --classes subset) are skipped."""
    class_label = {name: label for label, name in enumerate(collector.classes)}
    official_index = {name: index for index, name in enumerate(official, start=1)}
    for split, files in sorted(_split_lists(splits_dir).items()):
        for subset in SUBSETS:
            for where, fields in collector.rows(files[subset]):
                if len(fields) not in (1, 2):
                    raise DatasetError(f"{where}: expected '<class>/<video> [<class index>]', got {fields}")
                class_name, _ = _class_and_name(fields[0], where)
                if class_name not in official_index:
                    raise DatasetError(f"{where}: unknown class {class_name!r}")
                index = official_index[class_name]
                if len(fields) == 2 and _parse_int(fields[1], where, "class index") != index:
                    raise DatasetError(f"{where}: class index {fields[1]} disagrees with class {class_name!r} "
                                       f"(index {index} in the class list)")
                if class_name in class_label:
                    collector.add(where, fields[0], class_label[class_name], split, subset)
    return collector.finish(str(splits_dir), extra)


def _index_ucf101(inputs: _Inputs) -> DatasetIndex:
    """UCF-101: classes from ``classInd.txt`` (``<1-based index> <Class>``, indices 1..N in order)."""
    class_file = inputs.splits_dir / "classInd.txt"
    classes = []
    for where, fields in _read_rows(class_file):
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected '<index> <class>', got {fields}")
        if _parse_int(fields[0], where, "class index") != len(classes) + 1:
            raise DatasetError(f"{where}: class index {fields[0]} out of order, expected {len(classes) + 1}")
        if fields[1] in classes:
            raise DatasetError(f"{where}: duplicate class {fields[1]!r}")
        classes.append(fields[1])
    kept, extra = _select_classes(classes, inputs.classes, str(class_file))
    collector = _Collector("ucf101", inputs.root, kept, inputs.check_files, inputs.max_missing)
    return _collect_split_lists(collector, inputs.splits_dir, classes, extra)


def _index_hmdb51(inputs: _Inputs) -> DatasetIndex:
    """HMDB-51: one ``<class>_test_splitN.txt`` per class and split; classes are the file-name classes, sorted.
    The official files list 6,766 videos; 395 are unused (``0``) in all three splits and keep ``splits == {}``.

    Sorted order is Python's ``sorted()``. TSN's ``class_list.txt`` (not part of the official release) swaps two
    pairs relative to it (``kick_ball``/``kick`` and ``sword_exercise``/``sword``), so we do not follow it: labels
    20/21 and 44/45 differ from TSN's, everything else matches.
    """
    files: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(inputs.splits_dir.iterdir()):
        if match := _HMDB_SPLIT.match(path.name):
            files.setdefault(match.group(1), []).append((int(match.group(2)), path))
    if not files:
        raise DatasetError(f"{inputs.splits_dir}: no <class>_test_splitN.txt files")
    classes, extra = _select_classes(sorted(files), inputs.classes, str(inputs.splits_dir))
    collector = _Collector("hmdb51", inputs.root, classes, inputs.check_files, inputs.max_missing)
    for label, class_name in enumerate(classes):
        for split, path in files[class_name]:
            rows = collector.rows(path)
            for where, fields in rows:
                if len(fields) != 2 or fields[1] not in _HMDB_SUBSET or "/" in fields[0]:
                    raise DatasetError(f"{where}: expected '<video> <0|1|2>', got {fields}")
                collector.add(where, f"{class_name}/{fields[0]}", label, split, _HMDB_SUBSET[fields[1]])
            if rows and not any(fields[1] == "2" for _, fields in rows):
                collector.warnings.append(f"{path}: lists no test videos (label 2) for split {split}")
    return collector.finish(str(inputs.splits_dir), extra)


def _list_dir(directory: Path) -> list[Path]:
    """The non-hidden entries of ``directory``, sorted; an unreadable directory is a :class:`DatasetError`."""
    try:
        return sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DatasetError(f"{directory}: cannot read directory ({exc.strerror or exc})") from None


def _scan_folder(root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """``{class: [video files]}`` for every non-hidden class directory that holds videos, and warnings: skipped
    directories, non-video files and entries named like videos that are not files are reported rather than
    silently ignored."""
    tree: dict[str, list[Path]] = {}
    warnings: list[str] = []
    for class_dir in (p for p in _list_dir(root) if p.is_dir()):
        entries = _list_dir(class_dir)
        files = [p for p in entries if p.is_file()]  # is_file follows links: broken or looping ones are False
        for entry in entries:
            if entry.suffix.lower() in VIDEO_EXTENSIONS and not entry.is_file():
                what = "a directory" if entry.is_dir() else "a broken or looping link" if entry.is_symlink() else \
                    "not a regular file"
                warnings.append(f"{entry}: skipped, {what}")
        videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
        if len(videos) < len(files):
            others = sorted({p.suffix or p.name for p in files if p not in videos})
            warnings.append(f"{class_dir}: ignored {len(files) - len(videos)} non-video files ({', '.join(others)})")
        if videos:
            tree[class_dir.name] = videos
        else:
            warnings.append(f"{class_dir}: no video files, not a class")
    if not tree:
        raise DatasetError(f"{root}: no <class>/<video> files with extensions {', '.join(VIDEO_EXTENSIONS)}")
    return tree, warnings


def _index_folder(inputs: _Inputs) -> DatasetIndex:
    """Any ``<root>/<class>/<video>`` tree; classes are the sorted directory names that hold videos.

    With ``splits_dir``, UCF-101 style ``trainlist0N.txt`` / ``testlist0N.txt`` with paths relative to the root
    define the splits (and the records). Without it every video is ``"train"`` in split 1 and there is no test set.
    """
    tree, warnings = _scan_folder(inputs.root)
    classes, extra = _select_classes(list(tree), inputs.classes, str(inputs.root))
    collector = _Collector("folder", inputs.root, classes, inputs.check_files, inputs.max_missing)
    collector.warnings.extend(warnings)
    if inputs.splits_dir is not None:
        return _collect_split_lists(collector, inputs.splits_dir, list(tree), extra)
    for label, class_name in enumerate(classes):
        for video in tree[class_name]:
            collector.add(str(video), video.relative_to(inputs.root).as_posix(), label, 1, "train")
    return collector.finish(str(inputs.root), extra)


# ----------------------------------------------------------------------------------------------------------- FCVID


@dataclass(frozen=True)
class FcvidCategory:
    """One row of the keep/drop file."""

    index: int  # 1-based, in the file's (unofficial, ASCII-sorted) numbering
    name: str
    keep: bool
    reason: str


def default_fcvid_keep_file() -> Path:
    """The keep/drop file shipped with the package (our reading of which categories have obvious human motion)."""
    return Path(str(resources.files("pipeline") / "data" / DEFAULT_FCVID_KEEP_FILE))


def read_fcvid_keep_file(path: Path) -> list[FcvidCategory]:
    """Parse ``index<TAB>name<TAB>keep|drop<TAB>reason`` rows (after a header row; ``#`` lines are comments)."""
    rows = _read_rows(path, "\t", comments=True)
    header = next(rows, (str(path), []))
    if header[1] != ["index", "name", "decision", "reason"]:
        raise DatasetError(f"{header[0]}: expected the header 'index<TAB>name<TAB>decision<TAB>reason'")
    categories: list[FcvidCategory] = []
    for where, fields in rows:
        if len(fields) != 4 or fields[2] not in ("keep", "drop"):
            raise DatasetError(f"{where}: expected 'index<TAB>name<TAB>keep|drop<TAB>reason', got {fields}")
        index = _parse_int(fields[0], where, "category index")
        if any(c.index == index or c.name == fields[1] for c in categories):
            raise DatasetError(f"{where}: duplicate category {index} {fields[1]!r}")
        categories.append(FcvidCategory(index, fields[1], fields[2] == "keep", fields[3]))
    return categories


def _read_fcvid_categories(path: Path, keep_file: Path, decided: set[str]) -> dict[int, str]:
    """``<1-based index> <name>`` lines -> ``{index: name}``; every name needs a decision in the keep file."""
    categories: dict[int, str] = {}
    for where, fields in _read_rows(path):
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected '<index> <category name>', got {fields}")
        index = _parse_int(fields[0], where, "category index")
        if index in categories or fields[1] in categories.values():
            raise DatasetError(f"{where}: duplicate category {index} {fields[1]!r}")
        if fields[1] not in decided:
            raise DatasetError(f"{where}: category {fields[1]!r} has no keep/drop decision in {keep_file}; "
                               f"add it to a copy of that file and pass that as the keep file")
        categories[index] = fields[1]
    return categories


def _index_fcvid(inputs: _Inputs) -> DatasetIndex:
    """FCVID: ``<relative video path> <category index or name> [train|test]`` lines (CSV, TSV or whitespace).

    Category indices are those of ``categories_file`` (the release's numbering, which we do not have), so a
    numeric label without that file is an error; names work without it. Only categories marked ``keep`` in the
    keep/drop file are indexed; they are relabelled ``0..K-1`` in increasing original index and the mapping is
    stored in ``extra["relabel"]``. FCVID has one split: the third column, or ``train`` for every video when the
    file has none. One label per video: a video listed under two kept categories is an error.
    """
    keep_file = inputs.keep_file or default_fcvid_keep_file()
    decisions = {c.name: c for c in read_fcvid_keep_file(keep_file)}
    if inputs.categories_file is not None:
        numbering = _read_fcvid_categories(inputs.categories_file, keep_file, set(decisions))
    else:
        numbering = {c.index: c.name for c in decisions.values()}
    kept = sorted(i for i, name in numbering.items() if decisions[name].keep)
    if inputs.classes is not None:
        dropped = [name for name in inputs.classes if name in decisions and not decisions[name].keep]
        if dropped:
            raise DatasetError(f"{keep_file}: --classes names {dropped[0]!r}, which this keep file drops")
        names, _ = _select_classes([numbering[i] for i in kept], inputs.classes, str(keep_file))
        kept = [i for i in kept if numbering[i] in names]
    relabel = {original: new for new, original in enumerate(kept)}
    by_name = {name: index for index, name in numbering.items()}
    collector = _Collector("fcvid", inputs.root, [numbering[i] for i in kept], inputs.check_files, inputs.max_missing)
    dropped_videos, has_subset = 0, None
    for where, fields in collector.rows(inputs.labels_file, _delimiter_for(inputs.labels_file)):
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in SUBSETS):
            raise DatasetError(f"{where}: expected '<video path> <category> [train|test]', got {fields}")
        if has_subset is None:
            has_subset = len(fields) == 3
        elif has_subset != (len(fields) == 3):
            raise DatasetError(f"{where}: some lines give train/test and some do not")
        if fields[1].isdigit():
            if inputs.categories_file is None:
                raise DatasetError(f"{where}: numeric category {fields[1]} needs a categories file "
                                   f"(--categories-file) to say which category it is")
            original = int(fields[1])
        else:
            original = by_name.get(fields[1], -1)
        if original not in numbering:
            raise DatasetError(f"{where}: unknown category {fields[1]!r}")
        if original not in relabel:
            dropped_videos += 1
            continue
        collector.add(where, fields[0], relabel[original], 1, fields[2] if has_subset else "train")
    extra = {"relabel": relabel, "keep_file": str(keep_file), "dropped_videos": dropped_videos}
    return collector.finish(str(inputs.labels_file), extra)


# -------------------------------------------------------------------------------------------------------- Kinetics

KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
KINETICS_FILES = {"train": ("train.csv",), "test": ("validate.csv", "val.csv")}  # subset of split 1 -> CSV names


def kinetics_clip_name(youtube_id: str, start: int, end: int) -> str:
    """The file stem the Kinetics downloaders give a clip: ``<youtube_id>_<start:06d>_<end:06d>``."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


def _kinetics_files(root: Path) -> dict[str, str]:
    """Every video file under ``root`` by stem -> its path relative to ``root`` (the first in sorted order when a
    stem appears twice): one walk instead of a stat per listed clip, for a few hundred thousand clips."""
    found: dict[str, str] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension.lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                found.setdefault(stem, os.path.relpath(os.path.join(directory, name), root))
    return found


def _kinetics_rows(path: Path) -> Iterator[tuple[str, str, str, int, int]]:
    """``(file:line, label, youtube_id, start, end)`` of an annotation CSV, its header checked."""
    rows = _read_rows(path, ",")
    where, header = next(rows, (f"{path}:1", []))
    missing = [c for c in KINETICS_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{where}: expected a header with {', '.join(KINETICS_COLUMNS)}; lacks {', '.join(missing)}")
    column = {name: header.index(name) for name in KINETICS_COLUMNS}
    for where, fields in rows:
        if len(fields) < len(header):
            raise DatasetError(f"{where}: expected {len(header)} comma-separated fields, got {len(fields)}")
        try:
            start, end = (int(float(fields[column[c]])) for c in ("time_start", "time_end"))
        except ValueError:
            raise DatasetError(f"{where}: time_start and time_end must be numbers, got "
                               f"{fields[column['time_start']]!r}, {fields[column['time_end']]!r}") from None
        yield where, fields[column["label"]], fields[column["youtube_id"]], start, end


def _index_kinetics(inputs: _Inputs) -> DatasetIndex:
    """Kinetics: classes are the sorted labels of the CSVs (the official order); train/val are split 1's train/test.
    A listed clip found nowhere under the root is counted missing (see the module docstring), not an error."""
    csvs: dict[str, Path] = {}
    for subset, names in KINETICS_FILES.items():
        path = next((inputs.splits_dir / n for n in names if (inputs.splits_dir / n).is_file()), None)
        if path is None:
            raise DatasetError(f"{inputs.splits_dir}: no {' or '.join(names)} (the Kinetics annotation CSVs)")
        csvs[subset] = path
    rows = {subset: list(_kinetics_rows(path)) for subset, path in csvs.items()}
    official = sorted({label for listed in rows.values() for _, label, *_ in listed})
    classes, extra = _select_classes(official, inputs.classes, str(csvs["train"]))
    label_of = {name: label for label, name in enumerate(classes)}
    collector = _Collector("kinetics", inputs.root, classes, inputs.check_files, inputs.max_missing)
    files = _kinetics_files(inputs.root) if inputs.check_files else {}
    for subset, listed in rows.items():
        if not listed:
            collector.warnings.append(f"{csvs[subset]}: empty file, no videos listed")
        for where, label, youtube_id, start, end in listed:
            if label not in label_of:
                continue
            name = kinetics_clip_name(youtube_id, start, end)
            relative = files.get(name, f"{'train' if subset == 'train' else 'val'}/{label}/{name}.mp4")
            collector.add(where, relative, label_of[label], 1, subset)
    return collector.finish(str(inputs.splits_dir), extra)


# ---------------------------------------------------------------------------------------------------------- entry


@dataclass(frozen=True)
class _Adapter:
    index: Callable[[_Inputs], DatasetIndex]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


_ADAPTERS: dict[str, _Adapter] = {
    "ucf101": _Adapter(_index_ucf101, required=("splits_dir",)),
    "hmdb51": _Adapter(_index_hmdb51, required=("splits_dir",)),
    "fcvid": _Adapter(_index_fcvid, required=("labels_file",), optional=("categories_file", "keep_file")),
    "kinetics": _Adapter(_index_kinetics, required=("splits_dir",)),
    "folder": _Adapter(_index_folder, required=(), optional=("splits_dir",)),
}
DATASET_KINDS = tuple(_ADAPTERS)


def index_dataset(kind: str, root: Path, *, splits_dir: Path | None = None, labels_file: Path | None = None,
                  categories_file: Path | None = None, keep_file: Path | None = None, check_files: bool = True,
                  classes: Sequence[str] | None = None, max_missing: float = MAX_MISSING_FRACTION) -> DatasetIndex:
    """Index a dataset of ``kind`` (``ucf101``, ``hmdb51``, ``fcvid``, ``kinetics``, ``folder``) under ``root``.

    ``splits_dir`` holds the split lists (UCF-101, HMDB-51, the Kinetics CSVs; optional for folder trees); ``labels_file``,
    ``categories_file`` and ``keep_file`` are FCVID's (see :func:`_index_fcvid`). An option the kind does not use
    is an error rather than silently ignored. ``classes`` keeps only those classes (FCVID: categories), relabelled
    ``0..K-1`` in official order; ``max_missing`` is the share of a split's listed videos that may be missing on
    disk (0 to 1). See the module docstring for the error/warning policy.
    """
    if kind not in _ADAPTERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(_ADAPTERS)}")
    adapter = _ADAPTERS[kind]
    given = {"splits_dir": splits_dir, "labels_file": labels_file, "categories_file": categories_file,
             "keep_file": keep_file}
    for name, value in given.items():
        if value is None and name in adapter.required:
            raise DatasetError(f"dataset kind {kind!r} needs {name} (--{name.replace('_', '-')})")
        if value is not None and name not in adapter.required + adapter.optional:
            raise DatasetError(f"dataset kind {kind!r} does not use {name} (--{name.replace('_', '-')})")
    if splits_dir is not None and not splits_dir.is_dir():
        raise DatasetError(f"{splits_dir}: split directory not found")
    if (check_files or kind == "folder") and not root.is_dir():  # a folder tree is read from disk in any case
        raise DatasetError(f"{root}: dataset root is not a directory")
    if not 0 <= max_missing <= 1:  # `not`: NaN fails too
        raise DatasetError(f"max_missing must be a fraction from 0 to 1, got {max_missing}")
    if classes is not None and not classes:
        raise DatasetError("--classes names no class")
    inputs = _Inputs(root.resolve(), check_files, splits_dir, labels_file, categories_file, keep_file,
                     tuple(classes) if classes is not None else None, max_missing)
    return adapter.index(inputs)
