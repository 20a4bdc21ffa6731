"""The farm's run report (JSON + Markdown) and its plots: t-SNE of the profiles' masks coloured by majority
category (Figure 3) and the mask heatmaps of the two most distant profiles (Figure 6)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from xpeft.profiles.record import Profile, stored_mask_weights


def mask_matrix(profile: Profile, N: int, L: int) -> np.ndarray:
    """M_A and M_B stacked (2L × N): k-hot bits for hard profiles, softmax weights for soft ones."""
    wA, wB = stored_mask_weights(profile, N, L)
    if profile.mask_bits is not None:
        return torch.cat([wA > 0, wB > 0]).float().numpy()
    return torch.cat([wA, wB]).numpy()


def mask_diversity(profiles: list[Profile], N: int, L: int) -> dict[str, Any]:
    """How different the fitted profiles' masks are: a fit whose masks are all the same (k = N, or masks that
    never moved) is X-PEFT in name only, and the report must say so.

    Hard masks: distinct k-hot patterns, and the mean pairwise Hamming distance of their 2·L·N bits. Soft
    masks: distinct weight matrices (to 1e-3), and the mean pairwise total-variation distance per block
    (0: identical, 1: disjoint)."""
    x = [p for p in profiles if p.config.mode == "x_peft"]
    out: dict[str, Any] = {"profiles": len(x), "distinct": 0, "warning": None}
    if not x:
        return out
    mats = np.stack([mask_matrix(p, N, L).reshape(-1) for p in x])
    hard = all(p.mask_bits is not None for p in x)
    key = mats.astype(bool) if hard else np.round(mats, 3)
    out["distinct"] = int(len(np.unique(key, axis=0)))
    if len(x) > 1:
        i, j = np.triu_indices(len(x), 1)
        if hard:
            out["mean_hamming_bits"] = float((key[i] != key[j]).sum(1).mean())
            out["bits"] = int(key.shape[1])
        else:
            per_block = np.abs(mats[i] - mats[j]).reshape(len(i), 2 * L, N).sum(-1) / 2
            out["mean_tv_distance"] = float(per_block.mean())
    if len(x) > 1 and out["distinct"] == 1:
        out["warning"] = (
            f"all {len(x)} fitted profiles have the SAME masks: the masks carry nothing and every profile differs "
            "only by its LayerNorm and head (k = N? masks that never moved? check the mask learning rate and k)"
        )
    elif out["distinct"] < 0.9 * len(x):
        out["warning"] = f"only {out['distinct']} of {len(x)} fitted profiles have distinct masks"
    return out


METRICS = ("accuracy", "f1", "mse", "pearson")  # classification profiles have the first two, regression the last


def summarize(fitted: dict[str, dict]) -> dict[str, float]:
    """Averages over profiles (Figure 4): holdout accuracy and macro-F1 (classification) or MSE and Pearson's
    r (regression), NaNs left out."""
    if not fitted:
        return {"profiles": 0}
    out: dict[str, float] = {"profiles": len(fitted)}
    for key in METRICS:
        values = [m[key] for m in fitted.values() if key in m and not math.isnan(m[key])]
        if any(key in m for m in fitted.values()):
            out[key] = float(np.mean(values)) if values else float("nan")
    out["mean_record_bytes"] = float(np.mean([m["record_bytes"] for m in fitted.values()]))
    out["mean_seconds"] = float(np.mean([m["seconds"] for m in fitted.values()]))
    return out


def write_report(
    report, config: dict, out_dir: str, diversity: dict | None = None, plots: dict | None = None
) -> dict[str, str]:
    """Write report.json and report.md into out_dir; returns their paths. `diversity` is `mask_diversity` of
    the fitted profiles; `plots` the plot paths, or {"skipped": reason}."""
    os.makedirs(out_dir, exist_ok=True)
    body = asdict(report)
    body["summary"] = summarize(report.fitted)
    body["mask_diversity"] = diversity or {}
    body["plots"] = plots or {}
    body["profiles_per_minute"] = report.profiles_per_minute
    body["config"] = config
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump(body, f, indent=1, default=str)
    os.replace(paths["json"] + ".tmp", paths["json"])
    s = body["summary"]
    lines = [
        "# Profile farm run",
        "",
        f"- profiles fitted: {len(report.fitted)}; skipped (already stored): {len(report.skipped)}; "
        f"rejected (bad data): {len(report.rejected)}; failed: {len(report.failed)}; retries: {report.retries}",
        f"- actors: {report.actors}; wall time {report.seconds:.1f} s; {report.profiles_per_minute:.1f} profiles/min",
        f"- bank: {report.bank.get('source', '-')} N={report.bank.get('N', '-')} "
        f"fingerprint {str(report.bank.get('fingerprint', '-'))[:12]}",
        f"- memory per actor (RSS): {_mib(report.memory.get('rss_bytes_per_actor', []))}; bank read zero-copy "
        f"from the object store: {report.memory.get('bank_zero_copy', '-')}",
        *mask_lines(report.masks, diversity or {}, plots or {}),
        "",
        *summary_table(s),
        "",
    ]
    if report.rejected or report.failed:
        lines += ["## Not fitted", "", "| profile | reason |", "|---|---|"]
        lines += [f"| {p} | rejected: {r} |" for p, r in sorted(report.rejected.items())]
        lines += [f"| {p} | failed: {r} |" for p, r in sorted(report.failed.items())]
        lines.append("")
    keys = [k for k in ("accuracy", "f1", "mse", "pearson") if any(k in m for m in report.fitted.values())]
    lines += [
        "## Per profile",
        "",
        "| profile | n_train | n_test | " + " | ".join(keys) + " | bytes | training labels |",
        "|---|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for pid, m in sorted(report.fitted.items()):
        counts = ", ".join(f"{k} {v}" for k, v in (m.get("label_counts") or {}).items())
        values = " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys)
        lines.append(
            f"| {pid} | {m.get('n_train')} | {m.get('n_test')} | {values} | {m.get('record_bytes')} | {counts} |"
        )
    with open(paths["md"] + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(paths["md"] + ".tmp", paths["md"])
    return paths


def summary_table(s: dict) -> list[str]:
    names = {"accuracy": "mean holdout accuracy", "f1": "mean macro-F1", "mse": "mean MSE", "pearson": "mean Pearson r"}
    keys = [k for k in METRICS if k in s]
    head = ["profiles", *(names[k] for k in keys), "mean record bytes", "mean seconds/profile"]
    if not s.get("profiles"):
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| 0 |" + " - |" * (len(head) - 1)]
    row = [
        str(s["profiles"]),
        *(f"{s[k]:.4f}" for k in keys),
        f"{s['mean_record_bytes']:.0f}",
        f"{s['mean_seconds']:.2f}",
    ]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]


def mask_lines(masks: dict, diversity: dict, plots: dict) -> list[str]:
    """The report's lines on the masks: the k used and why, how distinct they are, and the plots."""
    lines = []
    if masks:
        k = f"k={masks['k']} of N={masks['N']}: {masks['why']}" if masks.get("k") else masks.get("why", "")
        lines.append(f"- masks: {masks.get('mask_type')}, {k}")
    if diversity.get("profiles"):
        dist = (
            f"mean pairwise Hamming distance {diversity['mean_hamming_bits']:.1f} of {diversity['bits']} bits"
            if "mean_hamming_bits" in diversity
            else f"mean pairwise total-variation distance {diversity['mean_tv_distance']:.3f} per block"
            if "mean_tv_distance" in diversity
            else "one profile"
        )
        lines.append(f"- distinct masks: {diversity['distinct']} of {diversity['profiles']} fitted profiles; {dist}")
    if diversity.get("warning"):
        lines.append(f"- **WARNING: {diversity['warning']}**")
    if plots.get("skipped"):
        lines.append(f"- **plots not drawn: {plots['skipped']}**")
    elif plots:
        lines.append(f"- plots: {', '.join(os.path.basename(v) for v in plots.values())}")
    return lines


def _mib(values: list[int]) -> str:
    return ", ".join(f"{v / 2**20:.0f} MiB" for v in values) or "-"


def majority(labels_by_profile: dict[str, list[int]]) -> dict[str, tuple[int, float]]:
    out = {}
    for pid, labels in labels_by_profile.items():
        label, count = Counter(labels).most_common(1)[0]
        out[pid] = (label, count / len(labels))
    return out


def plot_masks(
    profiles: list[Profile],
    N: int,
    L: int,
    labels_by_profile: dict[str, list[int]],
    label_names: list[str] | None,
    out_dir: str,
    seed: int = 0,
) -> dict[str, str]:
    """Figure 3 (t-SNE of masks, colour = majority category, size = its ratio) and Figure 6 (heatmaps of
    the two most distant profiles, Euclidean). Returns the paths, or {"skipped": why} when they cannot be
    drawn (fewer than 3 X-PEFT profiles or distinct masks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    profiles = [p for p in profiles if p.config.mode == "x_peft"]
    if len(profiles) < 3:
        return {"skipped": f"t-SNE and the heatmaps need at least 3 X-PEFT profiles; {len(profiles)} were fitted"}
    os.makedirs(out_dir, exist_ok=True)
    mats = np.stack([mask_matrix(p, N, L) for p in profiles])
    flat = mats.reshape(len(profiles), -1)
    distinct = len(np.unique(flat, axis=0))
    if distinct < 3:  # t-SNE is undefined on (nearly) identical points
        return {"skipped": f"only {distinct} distinct masks among {len(profiles)} profiles: nothing to embed"}
    maj = majority({p.profile_id: labels_by_profile.get(p.profile_id, [0]) for p in profiles})
    emb = TSNE(n_components=2, perplexity=min(30, len(profiles) - 1), random_state=seed, init="pca").fit_transform(flat)
    fig, ax = plt.subplots(figsize=(7, 6))
    cats = sorted({maj[p.profile_id][0] for p in profiles})
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(cats):
        idx = [j for j, p in enumerate(profiles) if maj[p.profile_id][0] == c]
        name = label_names[c] if label_names and c < len(label_names) else str(c)
        ax.scatter(
            emb[idx, 0],
            emb[idx, 1],
            s=[20 + 200 * maj[profiles[j].profile_id][1] for j in idx],
            color=cmap(i % 20),
            label=name,
            alpha=0.8,
        )
    ax.set_title(f"t-SNE of {len(profiles)} profiles' masks (colour: majority category, size: its ratio)")
    ax.legend(fontsize=7, loc="best")
    paths = {"tsne": os.path.join(out_dir, "masks_tsne.png"), "heatmaps": os.path.join(out_dir, "masks_heatmaps.png")}
    fig.tight_layout()
    fig.savefig(paths["tsne"], dpi=110)
    plt.close(fig)

    d = np.linalg.norm(flat[:, None, :] - flat[None, :, :], axis=-1)
    i, j = np.unravel_index(np.argmax(d), d.shape)
    fig, axes = plt.subplots(2, 2, figsize=(11, 5), sharex=True)
    for row, k in enumerate((i, j)):
        for col, (name, part) in enumerate((("M_A", mats[k][:L]), ("M_B", mats[k][L:]))):
            axes[row, col].imshow(part, aspect="auto", cmap="viridis", interpolation="nearest")
            axes[row, col].set_title(f"{profiles[k].profile_id}: {name}", fontsize=9)
            axes[row, col].set_ylabel("block l")
    for ax in axes[-1]:
        ax.set_xlabel("adapter i")
    fig.suptitle(f"Masks of the two most distant profiles (Euclidean distance {d[i, j]:.2f})")
    fig.tight_layout()
    fig.savefig(paths["heatmaps"], dpi=110)
    plt.close(fig)
    return paths


def finish_run(
    report, config: dict, store, datas: list, label_names: list[str] | None, out_dir: str, plots: bool = True
):
    """After a farm run: the mask diversity of the fitted profiles, the plots (or why they were not drawn),
    report.json / report.md. Returns (paths, diversity, plot_paths); warnings are logged loudly too."""
    import logging

    log = logging.getLogger(__name__)
    fitted = [store.get(pid) for pid in report.fitted]
    x = [p for p in fitted if p.config.mode == "x_peft"]
    diversity, drawn = {}, {}
    if x:
        N, L = int(report.bank["N"]), int(report.bank["L"])
        diversity = mask_diversity(x, N, L)
        if plots:
            by_profile = {d.profile_id: [r["label"] for r in d.train + d.test] for d in datas}
            drawn = plot_masks(x, N, L, by_profile, label_names, out_dir)
        else:
            drawn = {"skipped": "--no-plots"}
    if diversity.get("warning"):
        log.warning("VACUOUS MASKS? %s", diversity["warning"])
    if drawn.get("skipped"):
        log.warning("mask plots not drawn: %s", drawn["skipped"])
    paths = write_report(report, config, out_dir, diversity, drawn)
    return paths, diversity, drawn
