"""Evaluation of a trained model on the test split (positive class = valid, as the predecessor):
counts, accuracy, precision, recall, F1, ROC AUC, accuracy per kind and per source, how often a
flag names the right reason, and the report folder (JSON, confusion matrix, ROC curve, training
curves, contact sheet of the misclassified images). The threshold is calibrated on the
validation split (:func:`calibrate`), never on the test split."""

import json
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half)."""
    pos, neg = p[y == 1], p[y == 0]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    values = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # average ranks of ties
        tie = np.concatenate([pos, neg]) == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    predicted = p >= threshold
    tp, fp = int(np.sum(predicted & (y == 1))), int(np.sum(predicted & (y == 0)))
    tn, fn = int(np.sum(~predicted & (y == 0))), int(np.sum(~predicted & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"threshold": threshold, "n": len(y), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": (tp + tn) / len(y) if len(y) else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "roc_auc": roc_auc(y, p)}


def calibrate(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold on P(valid) with the best F1 on these (validation) images; among equals,
    the one nearest 0.5. Candidates are the midpoints between sorted scores."""
    values = np.unique(np.clip(p, 0, 1))
    candidates = np.concatenate([[0.5], (values[1:] + values[:-1]) / 2]) if len(values) > 1 else np.array([0.5])
    best = max(candidates, key=lambda t: (round(metrics(y, p, float(t))["f1"], 6), -abs(float(t) - 0.5)))
    return round(float(best), 6)


def group_accuracy(rows: list[dict], y: np.ndarray, p: np.ndarray, threshold: float, key) -> dict:
    """Accuracy per group of rows (``key(row)``): which kinds or sources the model gets wrong."""
    out: dict[str, dict] = {}
    for row, label, score in zip(rows, y, p):
        entry = out.setdefault(key(row), {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int((score >= threshold) == bool(label))
    return {k: {**v, "accuracy": v["correct"] / v["n"]} for k, v in sorted(out.items())}


def per_kind(rows: list[dict], y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    return group_accuracy(rows, y, p, threshold, lambda row: f"{row['class']}/{row['kind']}")


def source_of(row: dict) -> str:
    """Where a dataset image comes from: a registry package, synthetic studies, a picture
    package, the captured dialogs, or generated (drawn by the dataset builder)."""
    source, params = row["source"], json.loads(row["params"] or "{}")
    if "synthetic-dicom" in source:
        return "synthetic"
    if source:
        return source.split("/")[0]
    picture = str(params.get("picture", ""))
    if ":" in picture:
        return picture.split("=")[0]
    if row["kind"] == "screenshots":
        return "xvfb:windows"
    return "generated"


def per_source(rows: list[dict], y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    return group_accuracy(rows, y, p, threshold, lambda row: f"{row['class']}/{source_of(row)}")


def reason_accuracy(rows: list[dict], classes: np.ndarray, p_class: np.ndarray, threshold: float,
                    names: tuple[str, ...]) -> dict:
    """Of the invalid images that are flagged, how many get their own reason, per reason (the
    family, e.g. ``broken_render``, counts too)."""
    out: dict[str, dict] = {}
    flagged = (p_class[:, 0] < threshold) & (classes != 0)
    said = np.argmax(p_class[:, 1:], axis=1) + 1
    for i in np.flatnonzero(flagged):
        truth, guess = names[classes[i]], names[said[i]]
        entry = out.setdefault(truth, {"n": 0, "exact": 0, "family": 0})
        entry["n"] += 1
        entry["exact"] += int(truth == guess)
        entry["family"] += int(truth.split(":")[0] == guess.split(":")[0])
    return {k: {**v, "exact_share": v["exact"] / v["n"], "family_share": v["family"] / v["n"]}
            for k, v in sorted(out.items())}


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of P(valid) at every threshold."""
    order = np.argsort(-p, kind="mergesort")
    hits = y[order] == 1
    tpr = np.concatenate([[0], np.cumsum(hits) / max(1, hits.sum())])
    fpr = np.concatenate([[0], np.cumsum(~hits) / max(1, (~hits).sum())])
    return fpr, tpr


def plot_roc(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> None:
    fpr, tpr = roc_points(y, p)
    m = metrics(y, p, threshold)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr)
    ax.plot([m["fp"] / max(1, m["fp"] + m["tn"])], [m["recall"]], "o", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("false positive rate (invalid called valid)")
    ax.set_ylabel("true positive rate (valid called valid)")
    ax.set_title(f"test split, ROC AUC {m['roc_auc']:.4f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(m: dict, path: Path) -> None:
    grid = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.imshow(grid, cmap="Blues")
    for (i, j), n in np.ndenumerate(grid):
        ax.text(j, i, str(n), ha="center", va="center", color="black" if n < grid.max() / 2 else "white")
    ax.set_xticks([0, 1], ["invalid", "valid"])
    ax.set_yticks([0, 1], ["invalid", "valid"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test split, threshold {m['threshold']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_history(history: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for prefix in ("", "val_"):
            if prefix + key in history:
                ax.plot(range(1, len(history[prefix + key]) + 1), history[prefix + key],
                        marker="o", label="validate" if prefix else "train")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def contact_sheet(data: Path, rows: list[dict], p: np.ndarray, path: Path, tile: int = 128, limit: int = 100) -> int:
    """The misclassified images in a grid, each captioned with its kind and P(valid)."""
    columns = 10
    count = min(len(rows), limit)
    sheet = Image.new("L", (columns * tile, max(1, -(-count // columns)) * (tile + 14)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, (row, score) in enumerate(zip(rows[:limit], p[:limit])):
        x, y = (i % columns) * tile, (i // columns) * (tile + 14)
        with Image.open(data / row["file"]) as image:
            sheet.paste(image.convert("L").resize((tile, tile)), (x, y))
        draw.text((x + 2, y + tile), f"{row['kind'][:12]} {score:.2f}", fill=0)
    sheet.save(path)
    return count


def review_comparison(rows: list[dict], p_valid: np.ndarray, threshold: float) -> dict:
    """The new model (``p_valid`` at ``threshold``) and the one in use (the flag each reviewer
    saw, in the row's ``params``) against the reviewers' verdicts, by outcome of the review."""

    def compare(chosen: list[int]) -> dict:
        out = {"n": len(chosen), "in_use_right": 0, "new_right": 0, "corrections": 0,
               "corrections_new_right": 0, "by_outcome": {}}
        for i in chosen:
            params = json.loads(rows[i]["params"])
            invalid = params["verdict"] == "invalid"
            in_use, new = params["model_flagged"] == invalid, bool(p_valid[i] < threshold) == invalid
            out["in_use_right"] += in_use
            out["new_right"] += new
            out["corrections"] += not in_use
            out["corrections_new_right"] += new and not in_use
            kind = out["by_outcome"].setdefault(params["outcome"], {"n": 0, "new_right": 0})
            kind["n"] += 1
            kind["new_right"] += new
        return out

    return {"threshold": threshold, "all": compare(list(range(len(rows)))),
            "test": compare([i for i, r in enumerate(rows) if r["split"] == "test"])}


def write_report(folder: Path, data: Path, rows: list[dict], classes: np.ndarray, p_class: np.ndarray,
                 threshold: float, history: dict | None, extra: dict, names: tuple[str, ...]) -> dict:
    """The report of the test split: ``classes`` are the true class indices into ``names``
    (0 = valid), ``p_class`` the model's softmax."""
    folder.mkdir(parents=True, exist_ok=True)
    y, p = (classes == 0).astype(np.float32), p_class[:, 0]
    m = metrics(y, p, threshold)
    wrong = [i for i in range(len(y)) if (p[i] >= threshold) != bool(y[i])]
    report = {"test": m, "per_kind": per_kind(rows, y, p, threshold),
              "per_source": per_source(rows, y, p, threshold),
              "reasons": reason_accuracy(rows, classes, p_class, threshold, names),
              "misclassified": [{"file": rows[i]["file"], "label": int(y[i]), "p_valid": float(p[i])} for i in wrong],
              **extra}
    plot_confusion(m, folder / "confusion_matrix.png")
    plot_roc(y, p, threshold, folder / "roc_curve.png")
    if history:
        plot_history(history, folder / "training_curves.png")
    contact_sheet(data, [rows[i] for i in wrong], p[wrong], folder / "misclassified.png")
    (folder / "metrics.json").write_text(json.dumps(report, indent=2))
    return report
