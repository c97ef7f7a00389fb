"""Look inside a shard directory: a text summary, a strip image of one video, or its arrays as .npz."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store import ShardSet, atomic_output


def summary_text(shards: ShardSet) -> str:
    """Videos, frames, failures and the declared schema, as a few human-readable lines."""
    s = shards.schema
    lines = [
        f"{shards.root}: {s.kind} shards, format v{s.version}, {s.height}x{s.width} frames",
        f"  shards: {len(shards.complete_shards)} complete of {len(shards.plan)} planned",
    ]
    train_dir = shards.last_run.get("train_dir")
    if train_dir and not shards.last_run.get("keep_flow"):
        lines.append(f"  extract-flow --train-dir deletes each flow shard once its training shard is built: see "
                     f"asym3d inspect {train_dir}")
    lines.append(f"  videos: {len(shards.videos)} ok, {len(shards.failures)} failed; "
                 f"frames: {sum(v.n_frames for v in shards.videos)}; classes: {len(shards.classes)}")
    for spec in s.fields:
        enc = spec.encoding if spec.encoding == "jpeg" else f"{spec.dtype} x{spec.scale:g} {spec.compression or 'raw'}"
        lines.append(f"  field {spec.name}: {spec.channels} channels, {enc}; {spec.description}")
    flow = s.config.get("flow")
    if flow:
        lines.append(f"  flow: {flow.get('algorithm')} {flow.get('params')}")
    official = shards.dataset.get("extra", {}).get("official_labels")
    if official:
        of = shards.dataset["extra"].get("official_classes")
        pairs = ", ".join(f"{label}={name} ({official[name]})" for label, name in enumerate(shards.classes))
        lines.append(f"  class subset of {of} (label=name (official label)): {pairs}")
    lines.extend(_recorded_lines(shards))
    for failure in shards.failures[:20]:
        lines.append(f"  FAILED {failure['video_id']}: {failure['reason']}")
    if len(shards.failures) > 20:
        lines.append(f"  ... and {len(shards.failures) - 20} more failures (see manifest.json)")
    return "\n".join(lines)


def _recorded_lines(shards: ShardSet) -> list[str]:
    """What ran, per group of shards that share it: library versions, backend, device (never part of the identity,
    so one output can hold shards of several versions after an upgrade)."""
    groups: dict[str, list[str]] = {}
    for shard, recorded in shards.recorded.items():
        libraries = recorded.get("libraries", {})
        text = ", ".join(f"{k} {v}" for k, v in sorted(libraries.items()))
        ran = [f"{k} {recorded[k]}" for k in ("backend", "device", "torch") if k in recorded]
        groups.setdefault("; ".join(filter(None, [text, ", ".join(ran)])) or "not recorded", []).append(shard)
    lines = [f"  made with ({len(names)} shards): {text}" for text, names in groups.items()]
    if len(groups) > 1:
        lines.append("  warning: the shards were made with different library versions or backends")
    return lines


def flow_to_color(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """(n, H, W, 2) flow -> (n, H, W, 3) uint8 RGB: hue = direction, brightness = speed (the usual flow colouring)."""
    import cv2

    u, v = flow[..., 0], flow[..., 1]
    magnitude = np.hypot(u, v)
    scale = max_magnitude or max(float(magnitude.max()), 1e-6)
    hsv = np.empty(flow.shape[:-1] + (3,), np.uint8)
    hsv[..., 0] = ((np.degrees(np.arctan2(v, u)) % 360) / 2).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / scale * 255, 0, 255).astype(np.uint8)
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_HSV2RGB) for frame in hsv])


def strip_rows(shards: ShardSet, video_id: str, n: int = 8) -> list[tuple[str, np.ndarray]]:
    """Rows of ``n`` evenly spaced frames: RGB and colour-coded flow for flow shards; for training shards the
    stored RGB, flow image and RGBF rows (like the paper's Figure 5)."""
    if shards.schema.kind == "train":
        from pipeline.rgbf import figure_rows

        return figure_rows(shards, video_id, n)
    video = shards.video(video_id)
    pick = np.unique(np.linspace(0, max(video.n_frames - 2, 0), n).astype(int))
    return [("rgb", shards.read(video, "rgb", index=pick)),
            ("flow (hue: direction, brightness: speed)", flow_to_color(shards.read(video, "flow", index=pick)))]


def render_strip(shards: ShardSet, video_id: str, out: Path, n: int = 8) -> Path:
    """Write a PNG with one labelled row per modality (like the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = strip_rows(shards, video_id, n)
    cols = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        for c in range(cols):
            axes[r][c].imshow(frames[c])
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle(video_id, fontsize=9)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def dump_npz(shards: ShardSet, video_id: str, out: Path) -> Path:
    """Every stored field of one video, decoded, into one .npz."""
    video = shards.video(video_id)
    arrays = {name: shards.read(video, name) for name in shards.schema.field_names}
    with atomic_output(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return out
