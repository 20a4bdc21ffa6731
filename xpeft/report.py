"""The farm's run report (JSON + Markdown) and its plots: t-SNE of the profiles' masks coloured by majority
category (Figure 3) and the mask heatmaps of the two most distant profiles (Figure 6)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch

from xpeft.profiles import Profile, mask_weights


def mask_matrix(profile: Profile, N: int, L: int) -> np.ndarray:
    """M_A and M_B stacked (2L × N): k-hot bits for hard profiles, softmax weights for soft ones."""
    wA, wB = mask_weights(profile, N, L)
    if profile.mask_bits is not None:
        return torch.cat([wA > 0, wB > 0]).float().numpy()
    return torch.cat([wA, wB]).numpy()


def summarize(fitted: dict[str, dict]) -> dict[str, float]:
    """Averages over profiles (Figure 4): holdout accuracy and macro-F1."""
    if not fitted:
        return {"profiles": 0}
    acc = [m["accuracy"] for m in fitted.values() if not math.isnan(m.get("accuracy", float("nan")))]
    f1 = [m["f1"] for m in fitted.values() if not math.isnan(m.get("f1", float("nan")))]
    return {
        "profiles": len(fitted),
        "accuracy": float(np.mean(acc)) if acc else float("nan"),
        "f1": float(np.mean(f1)) if f1 else float("nan"),
        "mean_record_bytes": float(np.mean([m["record_bytes"] for m in fitted.values()])),
        "mean_seconds": float(np.mean([m["seconds"] for m in fitted.values()])),
    }


def write_report(report, config: dict, out_dir: str) -> dict[str, str]:
    """Write report.json and report.md into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    body = asdict(report)
    body["summary"] = summarize(report.fitted)
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
        "",
        "| profiles | mean holdout accuracy | mean macro-F1 | mean record bytes | mean seconds/profile |",
        "|---|---|---|---|---|",
        f"| {s.get('profiles', 0)} | {s.get('accuracy', float('nan')):.4f} | {s.get('f1', float('nan')):.4f} | "
        f"{s.get('mean_record_bytes', 0):.0f} | {s.get('mean_seconds', 0):.2f} |"
        if report.fitted
        else "| 0 | - | - | - | - |",
        "",
    ]
    if report.rejected or report.failed:
        lines += ["## Not fitted", "", "| profile | reason |", "|---|---|"]
        lines += [f"| {p} | rejected: {r} |" for p, r in sorted(report.rejected.items())]
        lines += [f"| {p} | failed: {r} |" for p, r in sorted(report.failed.items())]
        lines.append("")
    lines += [
        "## Per profile",
        "",
        "| profile | n_train | n_test | accuracy | macro-F1 | bytes |",
        "|---|---|---|---|---|---|",
    ]
    for pid, m in sorted(report.fitted.items()):
        lines.append(
            f"| {pid} | {m.get('n_train')} | {m.get('n_test')} | {m.get('accuracy', float('nan')):.4f} | "
            f"{m.get('f1', float('nan')):.4f} | {m.get('record_bytes')} |"
        )
    with open(paths["md"] + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(paths["md"] + ".tmp", paths["md"])
    return paths


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
    the two most distant profiles, Euclidean). Needs at least 3 x_peft profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    profiles = [p for p in profiles if p.config.mode == "x_peft"]
    if len(profiles) < 3:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    mats = np.stack([mask_matrix(p, N, L) for p in profiles])
    flat = mats.reshape(len(profiles), -1)
    if len(np.unique(flat, axis=0)) < 3:  # t-SNE is undefined on (nearly) identical points
        return {}
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
