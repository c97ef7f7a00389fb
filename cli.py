"""The `asym3d` command line: thin click commands that validate input and call one library function each."""
from __future__ import annotations

import math
from pathlib import Path

import click

# Choice lists and defaults come from the library they describe (tests/test_cli_options.py walks every option).
from model.clips import CROP_CHOICES
from model.checkpoint import CHECKPOINT_CHOICES
from model.config import SCHEDULES, TrainConfig
from model.export import EXPORT_FORMATS
from model.features import FEATURE_LAYERS
from model.networks import WEIGHT_INITS
from model.runtime import DEVICE_HELP, PRECISIONS, check_device, resolve_device
from pipeline.build_rgbf import DEFAULT_JPEG_QUALITY, DEFAULT_STORAGE, STORAGE
from pipeline.datasets import DATASET_KINDS
from pipeline.decode import DecodeConfig
from pipeline.demo_data import MAX_FRAMES, MOTIONS, NUM_SPLITS
from pipeline.errors import Asym3dError
from pipeline.flow import BACKENDS, TORCH_SOLVERS, TVL1_BACKENDS
from pipeline.rgbf import DEFAULT_FLOW_BOUND, MODALITIES
from pipeline.stage import BUILD_MAX_FAILURES, DEFAULT_MAX_FAILURES


class _Group(click.Group):
    """Turns the project's own errors (:class:`Asym3dError`) into click's one-line "Error: ..." with exit status 1.
    Nothing else is caught: any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Asym3dError as err:
            raise click.ClickException(str(err)) from None


class _Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf: they pass every range comparison and then poison the output
    (all-zero flow, NaN weights)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="asym3d")
def main() -> None:
    """asym3d: raw action videos to per-split accuracy tables with asymmetric 3D CNNs.

    Stages: extract-flow -> build-rgbf -> train -> evaluate. Each stage is resumable.
    """


def _parse_clip(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int, int]:
    """'16x112x112' -> (16, 112, 112); anything else is a BadParameter naming the expected form."""
    parts = value.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{value!r} is not TxHxW with three positive integers, e.g. 16x112x112")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


@main.command("models")
@click.option("--classes", "num_classes", type=click.IntRange(min=1), default=101, show_default=True)
@click.option("--clip", default="16x112x112", show_default=True, callback=_parse_clip, help="clip size TxHxW")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of {name, params, macs, ...}")
@click.option("--layers", "layers_of", metavar="NAME", help="per-layer breakdown of one network")
@click.option("--markdown", is_flag=True, help="print the README's markdown table of all networks")
def models_cmd(
    num_classes: int, clip: tuple[int, int, int], as_json: bool, layers_of: str | None, markdown: bool
) -> None:
    """Parameters and multiply-accumulates of every network (or of each layer of one)."""
    import json

    import model

    if markdown:
        click.echo(model.markdown_table(num_classes=num_classes, clip=clip), nl=False)
    elif layers_of:
        layers = model.layer_costs(layers_of, num_classes=num_classes, clip=clip)
        text = json.dumps([r.as_dict() for r in layers], indent=1) + "\n" if as_json else model.layer_table(layers)
        click.echo(text, nl=False)
    else:
        rows = model.model_summary(num_classes=num_classes, clip=clip)
        text = json.dumps([r.as_dict() for r in rows], indent=1) + "\n" if as_json else model.summary_table(rows)
        click.echo(text, nl=False)


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """'128x171' -> (128, 171) (height x width)."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{value!r} is not HxW with two positive integers, e.g. 128x171")
    return int(parts[0]), int(parts[1])


def _existing_path(**kwargs):
    return click.Path(exists=True, path_type=Path, **kwargs)


def _runner_options(func):
    """--jobs / --scheduler, shared by the preprocessing stages (one runner maps their per-shard function)."""
    func = click.option("--scheduler", metavar="ADDR",
                        help="run shards on an existing dask.distributed scheduler (tcp://host:8786) instead; it "
                             "must be trusted or use tls://; its workers need the input and output directories on "
                             "a shared filesystem")(func)
    return click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                        help="shards in parallel on this machine (joblib)")(func)


def _check_runner(jobs: int, scheduler: str | None) -> None:
    """Refuse contradicting options, and reach the scheduler before anything is written."""
    from pipeline.runner import check_scheduler

    if scheduler and jobs != 1:
        raise click.UsageError("give --jobs or --scheduler, not both")
    check_scheduler(scheduler)


def _parse_classes(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    """'A,B' or '@FILE' (one name per line) -> ['A', 'B']."""
    if value is None:
        return None
    if value.startswith("@"):
        try:
            names = Path(value[1:]).read_text(encoding="utf-8").split()
        except OSError as exc:
            raise click.BadParameter(f"{value[1:]}: cannot read ({exc.strerror or exc})") from None
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter(f"{value!r} names no class")
    return names


def _parse_max_failures(ctx: click.Context, param: click.Parameter, value: str) -> int | float:
    """'10' -> 10 videos; '0.2' -> a fifth of the videos."""
    try:
        number = int(value) if value.isdigit() else float(value)
    except ValueError:
        number = math.nan
    if isinstance(number, float) and not 0 <= number <= 1:  # NaN fails too
        raise click.BadParameter(f"{value!r} is neither a count (10) nor a fraction from 0 to 1 (0.2)")
    return number


def _max_failures_option(default: float):
    return click.option("--max-failures", default=str(default), show_default=True, callback=_parse_max_failures,
                        help="failed videos after which the run stops: a count (10) or a fraction of the videos "
                             "(0.2); 1.0 never stops")


def _echo_failures(failures) -> None:
    for failure in failures:
        click.echo(f"FAILED {failure['video_id']}: {failure['reason']}", err=True)


def _repair_option(func):
    return click.option("--repair", is_flag=True,
                        help="first verify every complete shard in OUT_DIR (as inspect --verify does) and recompute "
                             "exactly the damaged ones; they are kept as shard-N.h5.damaged")(func)


def _echo_repaired(damage) -> None:
    for shard in sorted({d.shard for d in damage}):
        click.echo(f"repaired {shard} (was: {'; '.join(str(d) for d in damage if d.shard == shard)})", err=True)


_BUILD_OPTIONS = ("modalities", "storage", "jpeg_quality", "flow_bound")


def _build_options(func):
    """What build-rgbf writes; shared with extract-flow --train-dir, which builds the same training shards."""
    for option in reversed([
        click.option("--modalities", default=",".join(MODALITIES), show_default=True,
                     help="comma-separated: rgb, flow (flow image u,v,|F|), rgbf (RGB x normalised |F|, paper eq. 7)"),
        click.option("--storage", type=click.Choice(list(STORAGE)), default=DEFAULT_STORAGE, show_default=True,
                     help="jpeg: ~0.07x raw size for the three modalities, lossy; lzf/gzip/raw: lossless uint8 (see "
                          "BENCHMARKS.md)"),
        click.option("--jpeg-quality", type=click.IntRange(1, 100), default=DEFAULT_JPEG_QUALITY, show_default=True),
        click.option("--flow-bound", type=_Finite(min=0, min_open=True), default=DEFAULT_FLOW_BOUND,
                     show_default=True,
                     help="flow image: u, v in [-B, B] px and |F| in [0, B] px map onto 0..255 (beyond saturates)"),
    ]):
        func = option(func)
    return func


def _build_config(modalities: str, storage: str, jpeg_quality: int, flow_bound: float):
    from pipeline.build_rgbf import BuildConfig

    return BuildConfig(modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()), storage=storage,
                       jpeg_quality=jpeg_quality, flow_bound=flow_bound)


# TV-L1 options: OpenCV's parameter names and defaults, recorded in the output schema.
_TVL1_OPTIONS = [
    ("--tau", "tau", float, "time step of the numerical scheme"),
    ("--lambda", "lambda_", float, "weight of the data term (smaller = smoother)"),
    ("--theta", "theta", float, "tightness between the two halves of the energy"),
    ("--nscales", "nscales", int, "pyramid levels"),
    ("--warps", "warps", int, "warps per pyramid level"),
    ("--epsilon", "epsilon", float, "stopping threshold"),
    ("--inner-iterations", "innerIterations", int, "inner iterations per warp"),
    ("--outer-iterations", "outerIterations", int, "outer iterations per warp"),
    ("--scale-step", "scaleStep", float, "size ratio between pyramid levels"),
    ("--gamma", "gamma", float, "illumination-change term weight"),
    ("--median-filtering", "medianFiltering", int, "median filter size on the flow"),
]


def _tvl1_options(func):
    from pipeline.tvl1_params import BOUNDS, TVL1Params

    defaults = TVL1Params()
    for flag, name, kind, text in reversed(_TVL1_OPTIONS):
        bound = BOUNDS.get(name)
        if bound is not None:  # the library's range: --help shows it, click refuses a value outside it
            kind = (_Finite if kind is float else click.IntRange)(bound.min, bound.max, min_open=bound.min_open,
                                                                   max_open=bound.max_open)
        func = click.option(flag, name, type=kind, default=getattr(defaults, name),
                            show_default=True, help=f"TV-L1: {text}")(func)
    return func


@main.command("extract-flow")
@click.argument("root", type=_existing_path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", "kind", type=click.Choice(DATASET_KINDS), default="folder",
              show_default=True, help="layout of ROOT (see the README)")
@click.option("--splits-dir", type=_existing_path(file_okay=False),
              help="official split lists (UCF-101: classInd/trainlist0N/testlist0N; HMDB-51: *_test_splitN.txt; "
                   "Kinetics: train.csv and validate.csv, split 1's train and test)")
@click.option("--labels-file", type=_existing_path(dir_okay=False), help="FCVID: video -> category list")
@click.option("--categories-file", type=_existing_path(dir_okay=False), help="FCVID: the 239 category names")
@click.option("--keep-file", type=_existing_path(dir_okay=False),
              help="FCVID: keep/drop decision per category [default: the reviewed list shipped with asym3d]")
@click.option("--classes", callback=_parse_classes, metavar="NAME,NAME|@FILE",
              help="only these classes (FCVID: categories), labelled 0..K-1 in the official order")
@click.option("--max-missing", type=_Finite(0, 1), default=0.5, show_default=True,
              help="share of a split's listed videos that may be missing on disk (1: any, for partial downloads)")
@_max_failures_option(DEFAULT_MAX_FAILURES)
@click.option("--size", default="128x171", show_default=True, callback=_parse_size, help="decoded frame size HxW")
@click.option("--fps", type=_Finite(min=0, min_open=True),
              help="resample to this constant frame rate [default: keep the source's own frames]")
@click.option("--max-frames", type=click.IntRange(min=2), default=20000, show_default=True,
              help="frames decoded per video at most")
@click.option("--timeout", type=_Finite(min=1), default=600, show_default=True,
              help="seconds before ffmpeg is stopped on one video")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto",
              show_default=True,
              help="auto: OpenCV CUDA TV-L1 if OpenCV has CUDA, else the torch TV-L1 on a CUDA GPU, else OpenCV CPU "
                   "TV-L1. cuda/cpu/torch are TV-L1; dis and farneback are fast NON-TV-L1 flows (recorded as such)")
@click.option("--device", help="torch backend: cuda, cuda:1 or cpu [default: cuda if available]")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="torch backend: frame pairs per batch, pooled across videos (bounds device memory) [default: 32 "
                   "on a CPU; on a GPU 1024 at 171x128, scaled by frame area]")
@click.option("--solver", type=click.Choice(TORCH_SOLVERS), default="auto", show_default=True,
              help="torch backend: eager (the reference: finished pairs leave the batch), fused (stopping flags kept "
                   "on the device), compiled (fused through torch.compile; each process first compiles, 10-45 s "
                   "measured); auto = compiled on a GPU (~2x eager's pairs/s on an H200 once compiled; on 11 clips "
                   "eager finished first, BENCHMARKS.md), eager on a CPU")
@_tvl1_options
@click.option("--videos-per-shard", type=click.IntRange(min=1), default=50, show_default=True)
@_runner_options
@click.option("--retry-failed", is_flag=True, help="retry videos recorded as failed (their shards are rewritten)")
@_repair_option
@click.option("--overwrite", is_flag=True, help="delete the shards of a different earlier configuration in OUT_DIR")
@click.option("--train-dir", type=click.Path(file_okay=False, path_type=Path),
              help="write the training shards (what build-rgbf writes, with the options below) into this directory "
                   "instead, made in memory: no flow shard is written, so peak disk ~ the training shards, not 7x "
                   "them")
@click.option("--keep-flow", is_flag=True, help="with --train-dir: write the flow shards too")
@click.option("--encode-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="with --train-dir and --jobs 1: processes computing the training images and JPEG while the one "
                   "process holding the flow backend decodes ahead and computes flow (0: all in that process)")
@_build_options
@click.pass_context
def extract_flow_cmd(ctx: click.Context, root: Path, out_dir: Path, kind: str, splits_dir, labels_file,
                     categories_file, keep_file, classes, max_missing, max_failures, size, fps, max_frames, timeout,
                     backend, device, batch_size, solver, videos_per_shard, jobs, scheduler, retry_failed, repair,
                     overwrite, train_dir, keep_flow, encode_workers, modalities, storage, jpeg_quality, flow_bound,
                     **tvl1) -> None:
    """Decode the videos under ROOT, compute optical flow, and write resumable HDF5 shards to OUT_DIR.

    Split files: a malformed line, unknown class or contradicting label is an error naming file:line; a listed
    video missing on disk is skipped with a warning (an error if more than --max-missing of a split is missing).
    Bad videos (corrupt, truncated, empty, not a video, a backend error) are recorded as failures and the rest goes
    on, up to --max-failures; the exit status is 1 when any video failed. A rerun skips complete shards.

    With --train-dir, the training shards are built in the same run (a rerun needs the same --train-dir); with
    the flow shards deleted, rebuilding the training shards with other options means computing the flow again.
    """
    from pipeline.datasets import index_dataset
    from pipeline.extract import ExtractConfig, extract_flow
    from pipeline.build_rgbf import FollowOn
    from pipeline.tvl1_params import TVL1Params

    given = [name for name in (*_BUILD_OPTIONS, "keep_flow", "encode_workers")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given and train_dir is None:
        raise click.UsageError(f"--{given[0].replace('_', '-')} needs --train-dir")
    train = None if train_dir is None else FollowOn(
        train_dir, _build_config(modalities, storage, jpeg_quality, flow_bound), keep_flow)
    cfg = ExtractConfig(decode=DecodeConfig(height=size[0], width=size[1], fps=fps, max_frames=max_frames,
                                            timeout_s=timeout),
                        backend=backend, tvl1=TVL1Params(**tvl1), device=device, batch_size=batch_size,
                        solver=solver, videos_per_shard=videos_per_shard, encode_workers=encode_workers)
    _check_runner(jobs, scheduler)
    index = index_dataset(kind, root, splits_dir=splits_dir, labels_file=labels_file, categories_file=categories_file,
                          keep_file=keep_file, classes=classes, max_missing=max_missing)
    for warning in index.warnings[:10]:
        click.echo(f"warning: {warning}", err=True)
    if len(index.warnings) > 10:
        click.echo(f"warning: ... {len(index.warnings) - 10} more (skipped lines and entries)", err=True)
    of = index.extra.get("official_classes")
    missing = "; ".join(f"split {s}: {m} of {n} listed videos missing" for s, (m, n) in index.missing.items() if m)
    click.echo(f"{index.kind}: {len(index.records)} videos, {len(index.classes)} classes"
               f"{f' (of {of})' if of else ''}{f'; {missing}' if missing else ''}; flow backend: {cfg.backend}",
               err=True)
    summary = extract_flow(index, out_dir, cfg, jobs=jobs, scheduler=scheduler, overwrite=overwrite,
                           retry_failed=retry_failed, repair=repair, max_failures=max_failures, train=train)
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    _echo_repaired(summary.repaired)
    written = summary.out_dir if train is None else (
        f"{train.out_dir} (flow shards {'kept in' if keep_flow else 'deleted from'} {summary.out_dir})")
    click.echo(f"{written}: {summary.videos_ok} videos ok, {len(summary.failures)} failed, "
               f"{summary.shards_skipped}/{summary.shards_total} shards already complete, "
               f"{summary.frames_decoded} frames decoded this run; flow by {summary.backend}")
    _echo_failures(summary.failures)
    if summary.failures:
        raise SystemExit(1)


@main.command("build-rgbf")
@click.argument("flow_dir", type=_existing_path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@_build_options
@_max_failures_option(BUILD_MAX_FAILURES)
@_runner_options
@_repair_option
@click.option("--overwrite", is_flag=True, help="delete the shards of a different earlier configuration in OUT_DIR")
def build_rgbf_cmd(flow_dir: Path, out_dir: Path, modalities: str, storage: str, jpeg_quality: int,
                   flow_bound: float, max_failures: int | float, jobs: int, scheduler: str | None, repair: bool,
                   overwrite: bool) -> None:
    """Turn extract-flow shards in FLOW_DIR into training shards in OUT_DIR: RGB, flow image and RGBF frames.

    One output shard per input shard (same videos, labels, splits); the input's failures are carried over (and not
    counted against --max-failures). A rerun skips complete shards. Exit status 1 when any video failed or some
    input shards are not written yet.
    """
    from pipeline.build_rgbf import build_rgbf

    cfg = _build_config(modalities, storage, jpeg_quality, flow_bound)
    _check_runner(jobs, scheduler)
    summary = build_rgbf(flow_dir, out_dir, cfg, jobs=jobs, scheduler=scheduler, overwrite=overwrite, repair=repair,
                         max_failures=max_failures)
    _echo_repaired(summary.repaired)
    click.echo(f"{summary.out_dir}: {summary.videos_ok} videos ok, {summary.videos_failed} failed, "
               f"{summary.shards_built} shards built, {summary.shards_skipped}/{summary.shards_planned} already "
               f"complete, {summary.frames_built} frames this run")
    _echo_failures(summary.failures)
    if summary.shards_waiting:
        click.echo(f"{len(summary.shards_waiting)} input shards not written yet by extract-flow "
                   f"({', '.join(summary.shards_waiting[:5])}...); rerun build-rgbf when it has finished", err=True)
    if not summary.complete:
        raise SystemExit(1)


@main.command("inspect")
@click.argument("shard_dir", type=_existing_path(file_okay=False))
@click.option("--video", "video_id", help="a video id (see manifest.json) to render or dump")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="with --video: write a PNG strip")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), help="with --video: dump its arrays")
@click.option("--frames", type=click.IntRange(min=1), default=8, show_default=True, help="frames in the strip")
@click.option("--verify", is_flag=True, help="check every stored array, every attribute (labels, splits, ...), "
                                             "dataset.json and manifest.json against their checksums; exit 1 naming "
                                             "each damaged file and video, 0 when all is clean")
def inspect_cmd(shard_dir: Path, video_id: str | None, out: Path | None, npz: Path | None, frames: int,
                verify: bool) -> None:
    """Summarise a shard directory (flow or training shards); render or dump one video; verify checksums."""
    from pipeline.inspect import dump_npz, render_strip, summary_text
    from pipeline.store import ShardSet

    if verify:
        from pipeline.verify import unverifiable, verify_dir

        damage = verify_dir(shard_dir)
        for d in damage:
            click.echo(f"DAMAGED {d}")
        damaged = {d.shard for d in damage}
        if damage:
            click.echo(f"{shard_dir}: {len(damaged)} damaged file(s)", err=True)
            raise SystemExit(1)
        unchecked = unverifiable(shard_dir)
        click.echo(f"{shard_dir}: every stored array and every attribute matches its checksum"
                   + (f"; {len(unchecked)} file(s) written before metadata checksums, whose labels, splits and "
                      f"attributes cannot be verified: {', '.join(unchecked[:5])}" if unchecked else ""))
        raise SystemExit(0)
    if (out or npz) and not video_id:
        raise click.UsageError("--out and --npz need --video")
    shards = ShardSet(shard_dir)
    click.echo(summary_text(shards))
    if video_id and out:
        click.echo(f"wrote {render_strip(shards, video_id, out, frames)}")
    if video_id and npz:
        click.echo(f"wrote {dump_npz(shards, video_id, npz)}")


@main.command("make-demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", type=click.IntRange(2, len(MOTIONS)), default=6, show_default=True,
              help=f"the first K of: {', '.join(MOTIONS)} (the first six survive the paper's flip augmentation; the "
                   "last four are mirror pairs)")
@click.option("--videos-per-class", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--groups", type=click.IntRange(NUM_SPLITS, 99), default=6, show_default=True,
              help="scenes gXX; split N tests the N-th third of them (at most --videos-per-class)")
@click.option("--frames", type=click.IntRange(2, MAX_FRAMES), default=32, show_default=True, help="frames per video")
@click.option("--size", default="128x171", show_default=True, callback=_parse_size, help="frame size HxW")
@click.option("--seed", type=int, default=0, show_default=True)
def make_demo_data_cmd(out: Path, classes: int, videos_per_class: int, groups: int, frames: int,
                       size: tuple[int, int], seed: int) -> None:
    """Write a synthetic action dataset to OUT in the UCF-101 layout (OUT/videos, OUT/splits).

    Classes differ only by how random textured objects move over random scenes, so a single frame cannot tell
    them apart. A rerun with the same options finishes an interrupted run; other options on the same OUT are refused.
    """
    from pipeline.demo_data import make_demo_dataset

    summary = make_demo_dataset(out, classes=classes, videos_per_class=videos_per_class, groups=groups,
                                frames=frames, height=size[0], width=size[1], seed=seed)
    click.echo(f"{summary.root}: {summary.num_videos} videos ({summary.encoded} encoded now), "
               f"{len(summary.class_names)} classes; videos in {summary.video_root}, splits in {summary.split_dir}")


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return check_device(value)  # its ConfigError names --device; main prints it in one line


def _schedules_text() -> str:
    """The presets of model.config.SCHEDULES in words, for --schedule's help (a preset's missing keys keep
    TrainConfig's defaults)."""
    texts = []
    for name, preset in SCHEDULES.items():
        s = {key: preset.get(key, getattr(TrainConfig, key)) for key in ("lr", "lr_step", "lr_gamma", "epochs",
                                                                          "fc8_lr_mult")}
        decay = f"/{1 / s['lr_gamma']:g} every {s['lr_step']} epochs" if s["lr_step"] else "constant"
        fc8 = f", fc8 at {s['fc8_lr_mult']:g}x lr" if s["fc8_lr_mult"] != 1 else ""
        texts.append(f"{name}: lr {s['lr']:g} {decay}, {s['epochs']} epochs{fc8}")
    return "; ".join(texts)


@main.command("train")
@click.argument("shard_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_name", required=True, help="network name (see `asym3d models`)")
@click.option("--input", "modality", type=click.Choice(MODALITIES), default=TrainConfig.input, show_default=True)
@click.option("--split", type=click.IntRange(min=1), default=1, show_default=True,
              help="train on this split, into OUT")
@click.option("--splits", help="comma-separated, e.g. 1,2,3: one run per split into OUT/splitN (evaluate reads either "
                               "layout from run.json)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="run dir")
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default=TrainConfig.schedule, show_default=True,
              help=f"paper §4.3 presets: {_schedules_text()}. Options below override")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1),
              help=f"clips per step per process [default: {TrainConfig.batch_size}]")
@click.option("--lr", type=_Finite(min=0, min_open=True), help="learning rate")
@click.option("--lr-step", type=click.IntRange(min=0), help="epochs between learning-rate decays (0: none)")
@click.option("--workers", type=click.IntRange(min=0),
              help=f"data loader processes [default: {TrainConfig.workers}]")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP, callback=_check_device)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--clip", default="16x112x112", show_default=True, callback=_parse_clip,
              help=f"frames x crop x crop; the crop must fit the stored frames ({DecodeConfig.height}x"
                   f"{DecodeConfig.width} by default) and the network's weights, gradients and momentum the "
                   "device's memory")
@click.option("--batch-norm", is_flag=True, help="BatchNorm after every convolution (not in the paper)")
@click.option("--dropout", type=_Finite(0, 1, max_open=True),
              help=f"dropout rate after fc6 and fc7 [default: {TrainConfig.dropout:g}, the paper's]")
@click.option("--weight-init", type=click.Choice(WEIGHT_INITS),
              help=f"initialisation from scratch [default: {TrainConfig.weight_init}: He convs, PyTorch's Linear "
                   "default for fc6/fc7]; c3d: the paper's Caffe C3D fillers; he: He fc6/fc7 too (unstable); "
                   "he-smallfc: fc6/fc7 N(0, 0.005); torch: PyTorch's defaults (BENCHMARKS.md, 'Training from "
                   "scratch')")
@click.option("--init", "init", type=_existing_path(dir_okay=False), help="start from this checkpoint's weights")
@click.option("--resume", is_flag=True, help="continue OUT/last.pt exactly where it stopped")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the network")
@click.option("--precision", type=click.Choice(PRECISIONS), default=TrainConfig.precision, show_default=True,
              help="auto: bf16 autocast with channels_last_3d on a GPU that supports bf16, float32 elsewhere; "
                   "evaluation follows the run's choice")
@click.option("--max-missing", type=_Finite(0, 1), default=0.05, show_default=True,
              help="largest fraction of planned videos that may be absent from the shards")
@click.option("--max-bad-videos", type=click.IntRange(min=0), default=10, show_default=True,
              help="videos whose stored frames cannot be read are skipped and counted; more than this stops the run")
@click.pass_context
def train_cmd(ctx: click.Context, shard_dir: Path, model_name: str, modality: str, split: int, splits: str | None,
              out_dir: Path,
              schedule: str, epochs, batch_size, lr, lr_step, workers, device: str, seed: int,
              clip: tuple[int, int, int], batch_norm: bool, dropout: float | None, weight_init: str | None,
              init: Path | None, resume: bool, compile_: bool, precision: str, max_missing: float,
              max_bad_videos: int) -> None:
    """Train a network on SHARD_DIR (build-rgbf output); checkpoints, metrics.csv and curves.png go to --out.

    Several GPUs: torchrun --nproc_per_node N -m cli train ... (DDP; --batch-size is per process).
    """
    from model.results import parse_splits
    from model.config import make_config
    from model.distributed import is_main_process
    from model.train import train, train_splits

    if clip[1] != clip[2]:
        raise click.BadParameter(f"the crop must be square, got {clip[1]}x{clip[2]}", param_hint="--clip")
    if splits and ctx.get_parameter_source("split") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("give --split N or --splits N,M,.., not both")
    cfg = make_config(schedule, shard_dir=str(shard_dir), out_dir=str(out_dir), model=model_name,
                      input=modality, split=split, epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step,
                      workers=workers, device=device, seed=seed, clip_len=clip[0], crop=clip[1],
                      batch_norm=batch_norm, dropout=dropout, weight_init=weight_init,
                      init=str(init) if init else None, resume=resume, compile=compile_, precision=precision,
                      max_missing=max_missing, max_bad_videos=max_bad_videos)
    results = train_splits(cfg, parse_splits(splits)) if splits else [train(cfg)]
    for result in results if is_main_process() else []:
        click.echo(f"{result['run_dir']}: best {result['best_on']} accuracy {result['best_acc']:.3f} "
                   f"(epoch {result['best_epoch']}), {result['train_videos']} train / {result['test_videos']} test "
                   f"videos, {result['absent_videos']} absent from the shards")


@main.command("evaluate")
@click.argument("run_dirs", nargs=-1, required=True, type=_existing_path(file_okay=False))
@click.option("--splits", default="1,2,3", show_default=True, help="comma-separated split numbers")
@click.option("--shards", "shard_dir", type=_existing_path(file_okay=False),
              help="training shards to read the test videos from [default: the checkpoint's shard_dir]")
@click.option("--checkpoint", "checkpoints", multiple=True, default=["best"], show_default=True,
              help="best, last or a path; once for all splits or repeated once per split")
@click.option("--clips", type=click.IntRange(min=1), default=25, show_default=True, help="clips per video")
@click.option("--crops", type=click.Choice([str(n) for n in CROP_CHOICES]), default="10", show_default=True,
              help="10: centre + 4 corners, each also mirrored; 1: centre only")
@click.option("--batch-size", type=click.IntRange(min=1), default=30, show_default=True, help="views per batch")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP, callback=_check_device)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="data loader workers")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="report directory [default: RUN_DIR/eval, or RUN_A/eval/fused_A+B with --fuse]")
@click.option("--fuse", is_flag=True, help="fuse the saved scores of several evaluated runs instead")
@click.option("--weights", help="with --fuse: one weight per run, e.g. 1,1 [default: equal]")
@click.option("--features", "feature_layer", type=click.Choice(["fc6", "fc7"]),
              help="also write features_splitN.npz: that layer's ReLU output averaged over each video's views")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the markdown table")
def evaluate_cmd(run_dirs: tuple[Path, ...], splits: str, shard_dir: Path | None, checkpoints: tuple[str, ...],
                 clips: int, crops: str, batch_size: int, device: str, workers: int, out: Path | None,
                 fuse: bool, weights: str | None, feature_layer: str | None, as_json: bool) -> None:
    """Test RUN_DIR's checkpoints with the paper's 25 clips x 10 crops: RUN_DIR/splitN/best.pt of a --splits run,
    RUN_DIR/best.pt of a --split N run (run.json says which split it holds).

    Writes to --out: results.md/.json (per split top-1, top-5, mean class accuracy; mean and std over splits),
    per_class_splitN.csv, confusion_splitN.png and scores_splitN.npz. With --fuse RUN_A RUN_B: the weighted mean
    of those saved scores (e.g. RGB + RGBF runs); runs whose videos or labels differ are refused.
    """
    import json

    from model.evaluate import evaluate_run
    from model.results import parse_splits
    from model.fusion import fuse_runs, parse_weights

    split_list = parse_splits(splits)
    if fuse:
        if len(run_dirs) < 2:
            raise click.UsageError("--fuse needs two or more runs")
        weight_list = parse_weights(weights) if weights else None
        summary = fuse_runs(run_dirs, split_list, weights=weight_list, out=out)
    else:
        if len(run_dirs) != 1 or weights:
            raise click.UsageError("give one RUN_DIR (several, and --weights, only with --fuse)")
        summary = evaluate_run(run_dirs[0], split_list, checkpoints=checkpoints, shard_dir=shard_dir, out=out,
                               clips=clips, crops=int(crops), batch_size=batch_size, device=device,
                               workers=workers, feature_layer=feature_layer)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=1))
    else:
        click.echo(summary["table"])
    click.echo(f"reports in {summary['out']}", err=True)


def _split_runs(paths: tuple[Path, ...], inputs_required: bool = True) -> tuple[list[Path], list[Path]]:
    """``RUN [RUN ...] VIDEO_OR_DIR ...`` -> (runs, inputs): the leading paths that are runs, then the rest."""
    from model.predict import is_run

    count = next((i for i, path in enumerate(paths) if not is_run(path)), len(paths))
    if count == 0:
        raise click.UsageError(f"{paths[0]}: not a run (a checkpoint .pt, or a directory holding them); give the "
                               "run(s) first, then the videos")
    if count == len(paths) and inputs_required:
        raise click.UsageError("give one or more videos (or directories of videos) after the run(s)")
    return list(paths[:count]), list(paths[count:])


def _predict_options(func):
    """Which checkpoint of each RUN, and how its input is made: shared by predict and features."""
    for option in reversed([
        click.option("--split", type=click.IntRange(min=1), default=1, show_default=True,
                     help="RUN/splitN/ for runs trained with --splits"),
        click.option("--checkpoint", "choice", type=click.Choice(CHECKPOINT_CHOICES), default="best",
                     show_default=True),
        click.option("--shards", "shard_dir", type=_existing_path(file_okay=False),
                     help="read how the input is made from these training shards' dataset.json (for checkpoints "
                          "written before checkpoints carried it)"),
        click.option("--batch-size", type=click.IntRange(min=1), default=30, show_default=True,
                     help="views per batch"),
        click.option("--device", default="auto", show_default=True, help=DEVICE_HELP, callback=_check_device),
        click.option("--flow-backend", type=click.Choice(TVL1_BACKENDS), default="auto",
                     show_default=True,
                     help="TV-L1 runs: which TV-L1 computes the flow (as extract-flow --backend)"),
    ]):
        func = option(func)
    return func


@main.command("predict")
@click.argument("paths", nargs=-1, required=True, type=_existing_path())
@_predict_options
@click.option("--clips", type=click.IntRange(min=1), default=25, show_default=True, help="clips per video")
@click.option("--crops", type=click.Choice([str(n) for n in CROP_CHOICES]), default="10", show_default=True,
              help="10: centre + 4 corners, each also mirrored; 1: centre only")
@click.option("--weights", help="several runs: one weight per run, e.g. 1,1 [default: equal]")
@click.option("--top", "top_k", type=click.IntRange(min=1), default=5, show_default=True, help="classes shown")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list (one entry per video) at the end")
@click.option("--csv", "as_csv", is_flag=True, help="print CSV rows: video,rank,class,probability")
def predict_cmd(paths: tuple[Path, ...], split: int, choice: str, shard_dir: Path | None, batch_size: int,
                device: str, flow_backend: str, clips: int, crops: str, weights: str | None, top_k: int,
                as_json: bool, as_csv: bool) -> None:
    """Classify videos: RUN [RUN ...] VIDEO_OR_DIR ...

    Each RUN (a checkpoint, or a run directory: RUN/splitN/best.pt or RUN/best.pt) scores each video with the
    paper's protocol (25 clips x 10 crops by default), its input made as its training shards were made (decoding,
    TV-L1 flow, flow image or RGBF, storage); several runs are fused by their weighted mean. A directory is walked
    for videos. A video that cannot be used is one line on stderr and the rest go on; exit status 1 then.
    """
    import json

    from model.fusion import parse_weights
    from model.predict import find_videos, load_run, predict_videos

    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    run_paths, inputs = _split_runs(paths)
    weight_list = parse_weights(weights) if weights else None
    device = str(resolve_device(device))
    runs = [load_run(path, split=split, choice=choice, shards=shard_dir) for path in run_paths]
    classes = runs[0].classes
    results, failed = [], 0
    if as_csv:
        click.echo("video,rank,class,probability")
    for prediction in predict_videos(runs, find_videos(inputs), clips=clips, crops=int(crops), weights=weight_list,
                                     batch_size=batch_size, device=device, flow_backend_name=flow_backend):
        if prediction.error:
            failed += 1
            click.echo(f"Error: {prediction.error}", err=True)
            results.append({"video": prediction.video, "error": prediction.error})
            continue
        top = prediction.top(classes, top_k)
        results.append({"video": prediction.video, "views": prediction.views,
                        "top": [{"class": name, "probability": p} for name, p in top]})
        if as_csv:
            for rank, (name, p) in enumerate(top, start=1):
                click.echo(f"{json.dumps(prediction.video)},{rank},{json.dumps(name)},{p:.6f}")
        elif not as_json:
            click.echo(f"{prediction.video}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    if as_json:
        click.echo(json.dumps(results, indent=1))
    if failed:
        raise SystemExit(1)


@main.command("features")
@click.argument("paths", nargs=-1, required=True, type=_existing_path())
@_predict_options
@click.option("--layer", type=click.Choice(tuple(FEATURE_LAYERS)), default="fc6", show_default=True,
              help="fc6/fc7: after their ReLU; pool5: flattened")
@click.option("--stride", type=click.IntRange(min=1), default=8, show_default=True,
              help="frames between the starts of consecutive windows (a window is the run's clip length)")
@click.option("--ten-crop", is_flag=True, help="each window's vector is the mean over the paper's 10 crops "
                                               "[default: the centre crop]")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="the .h5 file")
def features_cmd(paths: tuple[Path, ...], split: int, choice: str, shard_dir: Path | None, batch_size: int,
                 device: str, flow_backend: str, layer: str, stride: int, ten_crop: bool, out: Path) -> None:
    """C3D-style features: RUN [VIDEO_OR_DIR ...], or RUN --shards SHARD_DIR for every video stored there.

    One vector per window of the run's clip length every --stride frames, and per video their mean, keyed by video
    id (the path as given, or the shards' id) in --out (HDF5, checksummed). A rerun skips the videos already there
    (an interrupted run keeps what it finished in OUT.parts/); a video that cannot be used is one line on stderr
    and the rest go on (exit status 1 then).
    """
    from model.features import check_writable, extract_features, shard_sources, video_sources
    from model.predict import find_videos, load_run

    run_paths, inputs = _split_runs(paths, inputs_required=shard_dir is None)
    if len(run_paths) != 1:
        raise click.UsageError("give one RUN")
    check_writable(out)
    device = str(resolve_device(device))
    run = load_run(run_paths[0], split=split, choice=choice, shards=shard_dir)
    sources = (video_sources(run, find_videos(inputs), flow_backend, device) if inputs
               else shard_sources(run, shard_dir))
    summary = extract_features(run, sources, out, layer=layer, stride=stride, crops=10 if ten_crop else 1,
                               batch_size=batch_size, device=device,
                               on_failure=lambda line: click.echo(f"Error: {line}", err=True))
    click.echo(f"{out}: {summary.computed} videos computed, {summary.done_before} already there, "
               f"{len(summary.failures)} failed; {layer} every {stride} frames")
    if summary.failures:
        raise SystemExit(1)


@main.command("export")
@click.argument("run_path", metavar="RUN", type=_existing_path())
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="onnx needs pip install 'asym3d[onnx]'")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="the file to write")
@click.option("--check", "check_videos", multiple=True, type=_existing_path(dir_okay=False),
              help="videos whose views (made as predict makes them, 2 clips x 10 crops each) check the export "
                   "against PyTorch [default: seeded random views]")
@click.option("--split", type=click.IntRange(min=1), default=1, show_default=True,
              help="RUN/splitN/ for runs trained with --splits")
@click.option("--checkpoint", "choice", type=click.Choice(CHECKPOINT_CHOICES), default="best", show_default=True)
@click.option("--shards", "shard_dir", type=_existing_path(file_okay=False),
              help="with --check, for checkpoints that predate the schema: the training shards")
def export_cmd(run_path: Path, fmt: str, out: Path, check_videos: tuple[Path, ...], split: int, choice: str,
               shard_dir: Path | None) -> None:
    """Export RUN's network (TorchScript or ONNX, any batch size), checked against PyTorch before it is written.

    Prints the largest difference between the exported model and PyTorch on the checked views; above the stated
    bound nothing is written (exit status 1).
    """
    from model.checkpoint import load_checkpoint
    from model.export import check_format, export_run
    from model.features import check_writable
    from model.predict import VideoInputs, flow_backend, load_run, resolve_run

    check_format(fmt)
    check_writable(out)
    frames = []
    if check_videos:
        run = load_run(run_path, split=split, choice=choice, shards=shard_dir)
        backends = {} if run.recipe.modality == "rgb" else {
            run.recipe.identity(): flow_backend(run.recipe, "cpu", None, run.origin)}
        frames = [VideoInputs(video, backends).frames(run.recipe) for video in check_videos]
        state = run.state
    else:
        state = load_checkpoint(resolve_run(run_path, split, choice))
    summary = export_run(state, fmt, out, frames)
    checked = f"{summary.videos} real clip(s)" if summary.videos else "seeded random views (pass --check VIDEO)"
    click.echo(f"wrote {summary.out} ({summary.format}); checked against PyTorch on {summary.views} views of "
               f"{checked}: largest difference {summary.logit_diff:.3g} in the logits (bound {summary.bound:.3g}), "
               f"{summary.prob_diff:.3g} in the probabilities")


if __name__ == "__main__":
    main()
