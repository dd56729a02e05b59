"""Summaries, markdown tables and the Dice-vs-k plot (matplotlib, from the `bench` extra)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from FewShotSAMLib.atomic_write import write_atomically

from .datasets import DATASET_NOTES, DATASET_TITLES, DEVELOPMENT_SCANS

FEWSHOTSAM = "FewShotSAM"
FEWSHOTSAM_NO_TUNING = "FewShotSAM (no tuning)"
FEWSHOTSAM_NO_BLEND = "FewShotSAM (no small-structure blend)"
FEWSHOTSAM_NO_ZOOM = "FewShotSAM (no zoom)"
FEWSHOTSAM_NO_THIN = "FewShotSAM (no thin rule)"
SAM_POINT = "SAM point (centroid)"
SAM_BOX = "SAM box (reference box)"
FILL = "Fill between slices"
GROW = "Grow from seeds"
METHOD_ORDER = [FEWSHOTSAM, FEWSHOTSAM_NO_TUNING, FEWSHOTSAM_NO_BLEND, FEWSHOTSAM_NO_ZOOM, FEWSHOTSAM_NO_THIN, FILL,
                GROW, SAM_BOX, SAM_POINT]
K_INDEPENDENT = {SAM_POINT, SAM_BOX}  # prompted on every slice of the reference extent: no labelled slices

SSL_ALPNET_CHAOS_SETTING1_MEAN_DICE = 78.8  # Ouyang et al., ECCV 2020, Table 1, ABD-MRI (CHAOS T2), setting 1

# The fully supervised reference (benchmarks/supervised), read from the same results folder when present.
SUPERVISED = "Supervised 2D U-Net (MONAI)"
SUPERVISED_JSON = "supervised.json"
SUPERVISED_COLOUR = "black"
FEWSHOTSAM_KS_BESIDE_SUPERVISED = (1, 3, 5)

METRICS = ["dice", "iou", "hd95_mm", "assd_mm", "false_positive_slices", "dice_inside_reference_extent"]


# ----------------------------------------------------------------------------------------------------------------
# Summaries


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values) -> float | None:
    values = _finite(values)
    return float(np.mean(values)) if values else None


def _std(values) -> float | None:
    values = _finite(values)
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _non_finite(values) -> int:
    return sum(1 for v in values if v is None or not math.isfinite(float(v)))


def group(records: list[dict], **match) -> list[dict]:
    return [r for r in records if all(r.get(key) == value for key, value in match.items())]


def summarise(records: list[dict]) -> dict:
    """Means over scans of one (protocol, dataset, method, k) group.

    * ``dice`` etc.: mean over scans of the per-scan mean over structures (equal to the mean over structures of the
      per-structure means when every scan has every structure, as here).
    * ``dice_std``: sample standard deviation (ddof=1) across scans of the per-scan mean Dice.
    * distances: infinite values (a structure predicted empty, or predicted where the reference has none) are left
      out of the mean and counted in ``*_non_finite``.
    * ``per_structure``: mean over scans of each structure's Dice (and Dice inside the reference extent).
    """
    structures = list(OrderedDict.fromkeys(name for r in records for name in r["structures"]))
    per_scan = {metric: [] for metric in METRICS}
    non_finite = {metric: 0 for metric in METRICS}
    for record in records:
        for metric in METRICS:
            values = [scores[metric] for scores in record["structures"].values()]
            non_finite[metric] += _non_finite(values)
            per_scan[metric].append(_mean(values))
    summary = {
        "n_scans": len(records),
        "scans": [r["scan"] for r in records],
        "dice_std": _std(per_scan["dice"]),
        "seconds_per_scan": _mean([r["seconds"] for r in records]),
        "seconds_total": float(sum(r["seconds"] for r in records)),
        "labelled_slices": _mean([r.get("labelled_slices") for r in records]),
        "per_structure": {},
    }
    for metric in METRICS:
        summary[metric] = _mean(per_scan[metric])
        summary[f"{metric}_non_finite"] = non_finite[metric]
    for name in structures:
        have = [r["structures"][name] for r in records if name in r["structures"]]
        summary["per_structure"][name] = {
            "dice": _mean([s["dice"] for s in have]),
            "dice_inside_reference_extent": _mean([s["dice_inside_reference_extent"] for s in have]),
            "n_scans": len(have),
        }
    return summary


def summaries(records: list[dict]) -> list[dict]:
    """One summary per (protocol, dataset, method, k, training scans): train_size is None outside protocol 3."""
    keys = OrderedDict()
    for r in records:
        keys[(r["protocol"], r["dataset"], r["method"], r["k"], r.get("train_size"))] = None
    out = []
    for protocol, dataset, method, k, train_size in keys:
        selected = group(records, protocol=protocol, dataset=dataset, method=method, k=k, train_size=train_size)
        out.append({"protocol": protocol, "dataset": dataset, "method": method, "k": k, "train_size": train_size,
                    **summarise(selected)})
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out.sort(key=lambda s: (s["protocol"], s["dataset"], order.get(s["method"], 99), -1 if s["k"] is None else s["k"],
                            s["train_size"] or 0))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_failures(value, failures: int, digits: int = 1) -> str:
    text = _f(value, digits)
    return f"{text} ({failures} inf)" if failures else text


def _k_text(k) -> str:
    return "all†" if k is None else str(k)


def protocol1_tables(dataset: str, rows: list[dict]) -> list[str]:
    lines = [
        "| method | k | labelled slices | Dice mean ± std | IoU | HD95 mm | ASSD mm | FP slices | Dice in extent "
        "| s/scan | scans |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        std = "" if s["dice_std"] is None else f" ± {s['dice_std']:.3f}"
        lines.append(
            f"| {s['method']} | {_k_text(s['k'])} | {_f(s['labelled_slices'], 1)} | {_f(s['dice'])}{std} "
            f"| {_f(s['iou'])} "
            f"| {_with_failures(s['hd95_mm'], s['hd95_mm_non_finite'])} "
            f"| {_with_failures(s['assd_mm'], s['assd_mm_non_finite'], 2)} "
            f"| {_f(s['false_positive_slices'], 2)} | {_f(s['dice_inside_reference_extent'])} "
            f"| {_f(s['seconds_per_scan'], 1)} | {s['n_scans']} |"
        )
    structures = list(OrderedDict.fromkeys(name for s in rows for name in s["per_structure"]))
    lines += ["", f"Per-structure Dice ({DATASET_TITLES.get(dataset, dataset)}, protocol 1):", "",
              "| method | k | " + " | ".join(structures) + " | mean |",
              "|---|---|" + "---|" * (len(structures) + 1)]
    for s in rows:
        cells = [_f(s["per_structure"].get(name, {}).get("dice")) for name in structures]
        lines.append(f"| {s['method']} | {_k_text(s['k'])} | " + " | ".join(cells) + f" | {_f(s['dice'])} |")
    return lines


def development_split_table(dataset: str, records: list[dict]) -> list[str]:
    """Mean Dice per method and k on the scans settings were chosen on and on the held-out rest, side by side."""
    development = set(DEVELOPMENT_SCANS.get(dataset, []))
    mine = [r for r in records if r["protocol"] == 1 and r["dataset"] == dataset and r["k"] is not None]
    held_out = [r for r in mine if r["scan"] not in development]
    if not development or not held_out:
        return []
    lines = ["", f"Development scans ({', '.join(sorted(development))}) against held-out scans (the other "
             f"{len({r['scan'] for r in held_out})}), mean Dice:", "",
             "| method | k | development | scans | held out | scans |", "|---|---|---|---|---|---|"]
    keys = OrderedDict(((r["method"], r["k"]), None) for r in mine)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    for method, k in sorted(keys, key=lambda key: (order.get(key[0], 99), key[1])):
        cells = []
        for subset in ([r for r in mine if r["scan"] in development], held_out):
            chosen = group(subset, method=method, k=k)
            cells += [_f(summarise(chosen)["dice"]) if chosen else "", str(len(chosen))]
        lines.append(f"| {method} | {k} | " + " | ".join(cells) + " |")
    return lines


def protocol2_table(rows: list[dict], records: list[dict]) -> list[str]:
    structures = list(OrderedDict.fromkeys(name for s in rows for name in s["per_structure"]))
    lines = [
        "| method | scans | " + " | ".join(f"{n} (in extent)" for n in structures)
        + " | **mean Dice in extent** | mean whole-volume Dice | HD95 mm | FP slices | s/query |",
        "|---|---|" + "---|" * (len(structures) + 5),
    ]
    for s in rows:
        cells = [_f(s["per_structure"][n]["dice_inside_reference_extent"]) for n in structures]
        std = "" if s["dice_std"] is None else f" ± {s['dice_std']:.3f}"
        in_extent = [r for r in group(records, protocol=2, method=s["method"])]
        extent_means = [_mean([v["dice_inside_reference_extent"] for v in r["structures"].values()]) for r in in_extent]
        extent_std = _std(extent_means)
        extent_std_text = "" if extent_std is None else f" ± {extent_std:.3f}"
        lines.append(
            f"| {s['method']} | {s['n_scans']} | " + " | ".join(cells)
            + f" | **{_f(s['dice_inside_reference_extent'])}{extent_std_text}** | {_f(s['dice'])}{std} "
            f"| {_with_failures(s['hd95_mm'], s['hd95_mm_non_finite'])} | {_f(s['false_positive_slices'], 2)} "
            f"| {_f(s['seconds_per_scan'], 1)} |"
        )
    lines.append("| SSL-ALPNet (Ouyang et al., ECCV 2020), setting 1, quoted | – | "
                 + " | ".join("–" for _ in structures)
                 + f" | **{SSL_ALPNET_CHAOS_SETTING1_MEAN_DICE / 100:.3f}** | – | – | – | – |")
    return lines


def load_supervised(out: Path) -> dict | None:
    """supervised.json from the results folder ``out`` (written by benchmarks.supervised.run), or None."""
    path = Path(out) / SUPERVISED_JSON
    return json.loads(path.read_text()) if path.exists() else None


def _scan_mean_dice(record: dict) -> float | None:
    return _mean([scores["dice"] for scores in record["structures"].values()])


def supervised_reference(supervised: dict | None) -> dict | None:
    """The headline supervised result: the models trained on the most scans (every slice of a whole fold).

    Returns the dataset, those models and their test records, the mean over scans of the per-scan mean Dice, and
    a short text naming the training data; None when there is nothing to report.
    """
    records = (supervised or {}).get("records") or []
    if not records:
        return None
    size = max(r["train_size"] for r in records)
    records = [r for r in records if r["train_size"] == size]
    models = [m for m in supervised.get("models", []) if m["train_size"] == size]
    return {
        "dataset": supervised["run"].get("dataset", "chaos"),
        "train_size": size,
        "models": models,
        "records": records,
        "dice": _mean([_scan_mean_dice(r) for r in records]),
        "training_text": f"all slices of {size} other scan{'s' if size > 1 else ''}",
    }


def _mean_and_std_text(values) -> str:
    std = _std(values)
    return _f(_mean(values)) + ("" if std is None else f" ± {std:.3f}")


def _dice_cells(records: list[dict], organs: list[str]) -> list[str]:
    """Per-organ 'mean ± sd' over scans, then the mean over scans of the per-scan mean Dice ± its sd."""
    cells = [_mean_and_std_text([r["structures"][organ]["dice"] for r in records if organ in r["structures"]])
             for organ in organs]
    cells.append(f"**{_mean_and_std_text([_scan_mean_dice(r) for r in records])}**")
    return cells


def _minutes(models: list[dict]) -> str:
    return _f(_mean([m["seconds_trained"] / 60 for m in models]), 1)


def supervised_section(supervised: dict, records: list[dict]) -> list[str]:
    """Supervised U-Net beside FewShotSAM's protocol-1 results on the same scans, and the data-size curve."""
    run = supervised["run"]
    reference = supervised_reference(supervised)
    models, sup_records = reference["models"], reference["records"]
    scans = sorted((r["scan"] for r in sup_records), key=lambda name: (len(name), name))  # numeric order
    organs = list(OrderedDict.fromkeys(o for r in sup_records for o in r["structures"]))
    folds = "; ".join(f"fold {f['fold']}: trains on {', '.join(f['train_scans'])}, "
                      f"predicts {', '.join(f['test_scans'])}" for f in run.get("folds", []))
    settings = run.get("settings", {})
    lines = ["## Supervised reference (MONAI 2D U-Net)", ""]
    if run.get("quick"):
        lines += ["**Quick mode** (`--quick`): a smoke test of the pipeline, not a result.", ""]
    lines += [
        "A fully supervised model for scale, trained from scratch on **every slice** of other CHAOS scans and never "
        "shown the scan it predicts (`python -m benchmarks.supervised.run`).",
        "",
        f"- Cross-validation over the case list: {folds}.",
        f"- Network: {settings.get('network', 'MONAI UNet')}; input: axial slices resized to "
        f"{run.get('image_size')}x{run.get('image_size')}, intensities {settings.get('normalisation', '')}.",
        f"- Loss: {settings.get('loss', '')}; optimiser: {settings.get('optimiser', '')}; batch "
        f"{run.get('batch_size')}; augmentation: {settings.get('augmentation', '')}.",
        "- Prediction slice by slice, class probabilities resized back to the scan's grid, no post-processing; "
        "scored with the same `metrics.score_labels` as the tables above.",
        f"- Training was **bounded by wall time** on a shared 2-core CPU ({run.get('torch_threads')} torch "
        f"thread(s), MONAI {run.get('monai_version')}, torch {run.get('torch_version')}); "
        + ("commands " if run.get("history") else "command ")
        + ", then ".join(f"`{c}`" for c in [h.get("command") for h in run.get("history", [])] + [run.get("command")]
                         if c) + ".",
    ]
    if run.get("status") != "complete":
        lines.append(f"- Status of the last invocation: **{run.get('status')}**; the models it finished are kept.")
    if run.get("notes", {}).get("development"):
        lines.append(f"- Development: {run['notes']['development']}")
    lines += [
        "",
        "| model | training data | labelled slices | trained (min) | steps | epochs | final training loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(f"| fold {m['fold']} | all slices of scans {', '.join(m['train_scans'])} | {m['train_slices']} "
                     f"| {m['seconds_trained'] / 60:.1f} (budget {m['budget_minutes']:g}) | {m['steps']} "
                     f"| {m['epochs']:.1f} | {_f(m.get('final_training_loss'))} |")
    lines += [
        "",
        f"Per-organ Dice, mean ± sd over the {len(scans)} scans each method segmented (scans {', '.join(scans)}); "
        "the last column is the mean over scans of the per-scan mean Dice ± its sd across scans:",
        "",
        "| method | labelled data | " + " | ".join(organs) + " | mean Dice ± sd | scans |",
        "|---|---|" + "---|" * (len(organs) + 2),
        f"| {SUPERVISED} | none of the scan itself; {reference['training_text']} "
        f"(~{_f(_mean([m['train_slices'] for m in models]), 0)} slices) | "
        + " | ".join(_dice_cells(sup_records, organs)) + f" | {len(sup_records)} |",
    ]
    for k in FEWSHOTSAM_KS_BESIDE_SUPERVISED:
        mine = [r for r in group(records, protocol=1, dataset=reference["dataset"], method=FEWSHOTSAM, k=k)
                if r["scan"] in scans]
        if not mine:
            continue
        labelled = _f(_mean([r.get("labelled_slices") for r in mine]), 1)
        lines.append(f"| {FEWSHOTSAM}, protocol 1, k={k} | {labelled} slices of the scan itself (k per organ) | "
                     + " | ".join(_dice_cells(mine, organs)) + f" | {len(mine)} |")
    worst = min(sup_records, key=lambda r: _scan_mean_dice(r) or 0.0)
    lines += [
        "",
        f"Lowest U-Net scan: {worst['scan']}, mean Dice {_f(_scan_mean_dice(worst))} ("
        + ", ".join(f"{organ} {_f(scores['dice'])}" for organ, scores in worst["structures"].items()) + ").",
        "",
        "The two use different information: the U-Net learns from a few hundred labelled slices of *other* patients "
        "and gets nothing from the test scan; FewShotSAM gets k labelled slices *of the test scan itself* (scored "
        "with them included, as in protocol 1) and a frozen encoder pretrained elsewhere. The U-Net's size and "
        "training time are capped by the CPU, so it is a lower bound on what supervised training reaches on CHAOS "
        "(nnU-Net-style models train for hours on a GPU). FewShotSAM's defaults were chosen on CHAOS (see above); "
        "the U-Net's settings were not tuned" + (" beyond the development note above." if run.get("notes", {}).get(
            "development") else "."),
        "",
    ]
    sizes = sorted({r["train_size"] for r in supervised["records"]})
    if len(sizes) > 1:
        # Compare sizes on the same test scans: a stopped run can leave a size with one fold only.
        common = set.intersection(*({r["scan"] for r in supervised["records"] if r["train_size"] == size}
                                    for size in sizes))
        all_scans = {r["scan"] for r in supervised["records"]}
        subset = "" if common == all_scans else (
            f" Not every size was run on both folds, so all rows are restricted to the test scans every size was "
            f"evaluated on: {', '.join(sorted(common, key=lambda name: (len(name), name)))}.")
        lines += [
            "Dice as the labelled data grow: per fold, a model trained on all slices of the fold's first n training "
            "scans (case-number order), evaluated on the fold's test scans (the n = "
            f"{reference['train_size']} row is the model above). Training budgets differ between rows: see the "
            f"minutes column.{subset}",
            "",
            "| training scans per model | folds | labelled slices (mean per model) | trained (min per model) | "
            "steps (mean) | " + " | ".join(organs) + " | mean Dice ± sd | scans |",
            "|---|---|---|---|---|" + "---|" * (len(organs) + 2),
        ]
        for size in sizes:
            size_records = [r for r in supervised["records"] if r["train_size"] == size and r["scan"] in common]
            folds_used = sorted({r["fold"] for r in size_records})
            size_models = [m for m in supervised.get("models", []) if m["train_size"] == size
                           and m["fold"] in folds_used]
            lines.append(f"| {size} | {', '.join(folds_used)} "
                         f"| {_f(_mean([m['train_slices'] for m in size_models]), 0)} "
                         f"| {_minutes(size_models)} | {_f(_mean([m['steps'] for m in size_models]), 0)} | "
                         + " | ".join(_dice_cells(size_records, organs)) + f" | {len(size_records)} |")
        lines.append("")
    return lines


def supervised_on_scans(supervised: dict | None, train_size: int, scans) -> list[dict]:
    """The supervised U-Net's test records at ``train_size`` training scans, on the given query scans only.

    Protocol 3 uses the U-Net's folds, and a CHAOS scan is a test scan of one fold only, so these come from a model
    trained on the same scans as FewShotSAM's adapter.
    """
    return [r for r in (supervised or {}).get("records") or [] if r["train_size"] == train_size and r["scan"] in scans]


def _protocol3_cell(records: list[dict]) -> str:
    """Mean over query scans of the per-scan mean Dice ± its sd, and (the number of query scans)."""
    if not records:
        return "–"
    return f"{_mean_and_std_text([_scan_mean_dice(r) for r in records])} ({len(records)})"


def protocol3_table(records: list[dict], supervised: dict | None) -> list[str]:
    """Rows: FewShotSAM, its training-free variant and the supervised U-Net; columns: training scans per model."""
    p3 = group(records, protocol=3)
    sizes = sorted({r["train_size"] for r in p3})
    lines = [
        "| method | " + " | ".join(f"{n} training scan{'s' if n > 1 else ''}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in (FEWSHOTSAM, FEWSHOTSAM_NO_TUNING):
        if group(p3, method=method):
            lines.append(f"| {method} | "
                         + " | ".join(_protocol3_cell(group(p3, method=method, train_size=n)) for n in sizes) + " |")
    if (supervised or {}).get("records"):
        cells = [_protocol3_cell(supervised_on_scans(supervised, n, {r["scan"] for r in group(p3, train_size=n)}))
                 for n in sizes]
        lines.append(f"| {SUPERVISED}, every slice of the same scans (time-bounded training) | "
                     + " | ".join(cells) + " |")
    labelled = [_f(_mean([r["labelled_slices"] for r in group(p3, train_size=n)]), 0) for n in sizes]
    lines.append("| labelled slices FewShotSAM adapts on (mean per model) | " + " | ".join(labelled) + " |")
    return lines


def protocol3_section(run: dict, records: list[dict], supervised: dict | None) -> list[str]:
    lines = ["## Protocol 3: labelled data vs accuracy, across scans (CHAOS)", ""]
    if not group(records, protocol=3):
        return lines + ["Not run in this invocation.", ""]
    folds = "; ".join(f"fold {f['fold']}: training scans {', '.join(f['train_scans'])}, queries "
                      f"{', '.join(f['test_scans'])}" for f in run.get("protocol3_folds", []))
    lines += [
        "FewShotSAM adapted on **every labelled slice** (every slice holding an organ, fully labelled from the "
        "reference) of the first n training scans of a fold, in case-number order: one "
        "`engine.adapt([(scan, labels), ...])` per fold and n, then `engine.apply(adapter, query)` on each "
        "unlabelled query scan of the fold. The folds are the supervised U-Net's "
        f"(`benchmarks.accuracy.datasets.chaos_training_folds`: {folds}), so its row below comes from models trained "
        "on all slices "
        "of the same scans and tested on the same queries (see the supervised reference for its training budgets; "
        "'–' or fewer query scans: not every fold's model was trained at that size). Cells: whole-volume Dice, "
        "mean over the query scans of the per-scan mean over organs ± sd across scans, (number of query scans). "
        "FewShotSAM's wall times (below) include the adaptation, shared by the fold's queries.",
        "",
    ]
    lines += protocol3_table(records, supervised)
    lines.append("")
    return lines


def markdown(result: dict, supervised: dict | None = None) -> str:
    """The report; ``supervised``: the content of supervised.json (see load_supervised), or None."""
    run = result["run"]
    records = result["records"]
    rows = result["summaries"]
    lines = ["# FewShotSAM accuracy benchmark", ""]
    lines += [
        f"- Status: **{run['status']}**; started {run['started']}, wall time {run['wall_seconds'] / 60:.1f} min "
        f"({run['threads']} CPU thread(s), device {run['device']}).",
        f"- Model: `{run['model']}` ({run['weights_id']}); FewShotSAMLib commit `{run.get('commit') or 'unknown'}`.",
        f"- Command: `{run['command']}`",
    ]
    for part in run.get("merged_from", []):
        lines.append(f"- Merged from `{part['folder']}`: `{part['command']}`, commit `{part['commit']}`, "
                     f"status: {part['status']}, {(part.get('wall_seconds') or 0) / 60:.1f} min.")
    for earlier in run.get("history", []):
        lines.append(f"- Resumed (`--resume`) from an earlier invocation: started {earlier.get('started')}, "
                     f"{(earlier.get('wall_seconds') or 0) / 60:.1f} min, commit `{earlier.get('commit')}`, "
                     f"status: {earlier.get('status')}. Its records are kept; only what it had not done was run here.")
    if run.get("history"):
        lines.append(f"- Wall time over all invocations: {run['wall_seconds_all_invocations'] / 60:.1f} min.")
    lines += [
        "",
        "## What ran",
        "",
    ]
    for line in run["coverage"]:
        lines.append(f"- {line}")
    lines += [
        "",
        "## How to read this",
        "",
        "- **Protocol 1 (within one scan)**: for each structure, `few_shot_labels(reference, axis, k)` picks k slices "
        "at the "
        "centres of k equal chunks of its extent (k=1: middle, k=3: 1/6, 1/2, 5/6); every picked slice is copied fully "
        "from the reference (all structures on it, so it also says where they are absent). Each method then segments "
        "the whole volume. 'labelled slices' is the mean number of distinct labelled slices per scan (the union over "
        "structures). Scores are over the whole volume, labelled slices included (FewShotSAM, Fill between slices and "
        "Grow from seeds keep them as painted).",
        "- Dice / IoU / HD95 / ASSD / FP slices: `FewShotSAMLib.metrics.score_labels`, per structure, averaged over "
        "structures per scan, then over scans; ± is the sample std across scans of the per-scan mean Dice. HD95 and "
        "ASSD are MedPy-style (pooled, mm); '(n inf)' counts structure-scan pairs where one mask was empty (left out "
        "of the mean). 'FP slices' = slices with the structure predicted but absent from the reference (mean per "
        "structure per scan). 'Dice in extent' = Dice restricted to the slices where the reference has the structure.",
        "- **k = all†**: the prompted-SAM baselines get no labelled slices; instead they are prompted on *every* slice "
        "where the reference has the structure, from the reference itself (true extent along the slice axis plus a "
        "centroid point or the tight bounding box on each slice). They are optimistic upper-bound-style baselines, "
        "not something a user could run from k slices. LiteMedSAM was trained with box prompts only, so its point "
        "prompts are expected to fail (the point rows are reported as measured).",
        "- FewShotSAM = `Engine.propagate` with its defaults (pixel prompts, structure tokens, decoder tuned for "
        f"{run['decoder_steps']} steps); 'no tuning' = the same with `adapt.decoder_steps = 0` (training-free).",
        "- 'no small-structure blend' = FewShotSAM with `small_structures.enabled = False`: the engine's own outline "
        "for structures under 32 voxels across or 16 thick, instead of its average with the painted shape "
        "(`FewShotSAMLib/small_structures.py`); 'no zoom' = with `zoom.enabled = False` (`FewShotSAMLib/zoom.py`); "
        "'no thin rule' = with `small_structures.thin = False`: the blend for structures under 32 voxels across only, "
        "not for those only thin (under 16 voxels thick, however long).",
        "- Fill between slices / Grow from seeds: Slicer's own implementations (slicer-core), "
        "`benchmarks/baselines/slicer_baselines.py`, with the same painted slices.",
        "- **Hyper-parameters**: nothing was tuned on these runs. FewShotSAM's defaults were chosen by the engine "
        "developer on CHAOS during development, so **CHAOS numbers are not a held-out estimate**; the small-structure "
        "settings were chosen on the hippocampus development scans named below, and the hippocampus table splits "
        "them from the held-out rest; the TotalSegmentator CTs and MRI and the spinal cord scans were not used for "
        "development and are held out.",
        "- Wall times are per scan on this machine's CPU, excluding image encoding (done once per scan and cached; "
        "reported separately below); they include adaptation (pixel prompts + decoder tuning) for FewShotSAM.",
        "",
    ]
    datasets = list(OrderedDict.fromkeys(s["dataset"] for s in rows if s["protocol"] == 1))
    for dataset in datasets:
        ds_rows = [s for s in rows if s["protocol"] == 1 and s["dataset"] == dataset]
        lines += [f"## Protocol 1: {DATASET_TITLES.get(dataset, dataset)}", "", DATASET_NOTES.get(dataset, ""), ""]
        lines += protocol1_tables(dataset, ds_rows)
        lines += development_split_table(dataset, result["records"])
        lines.append("")
    p2 = [s for s in rows if s["protocol"] == 2]
    lines += ["## Protocol 2: across scans, CHAOS 1-shot (published setting)", ""]
    if p2:
        lines += [
            "One support scan with 3 labelled slices per organ at 1/6, 1/2 and 5/6 of each organ's extent "
            "(`fractions_of_extent`, the SSL-ALPNet support rule); each chosen slice is labelled fully (every organ "
            "on it, so about 11 distinct support slices per scan), which gives somewhat more than SSL-ALPNet's "
            "per-organ binary support; `engine.adapt([(support, labels)])`, then "
            "`engine.apply(adapter, query)` on an unlabelled query scan. "
            f"Folds: {run.get('protocol2_folds_text', '')}. "
            "Scored by Dice inside the reference extent (`metrics.dice_inside_reference_extent`: only the query "
            "slices that contain the organ, the published evaluation) and by whole-volume Dice (which also counts "
            "false positives outside the organ's slices).",
            "",
        ]
        lines += protocol2_table(p2, records)
        lines += [
            "",
            "SSL-ALPNet's 78.8 is quoted from the paper (setting 1, its own 5-fold evaluation, mean of liver, kidneys "
            "and spleen Dice in %); **training data differ**: SSL-ALPNet is trained self-supervised on the CHAOS scans "
            "themselves, FewShotSAM uses a frozen SAM-family encoder pretrained elsewhere and adapts only on the "
            "support slices, and the support/query pairing here is our own fold scheme. Also, FewShotSAM's "
            "hyper-parameters were "
            "chosen on CHAOS. The comparison is indicative, not like-for-like.",
            "",
        ]
    else:
        lines += ["Not run in this invocation.", ""]
    lines += protocol3_section(run, records, supervised)
    if supervised_reference(supervised):
        lines += supervised_section(supervised, records)
    else:
        lines += [
            "## Supervised reference: not run",
            "",
            "A fully supervised model (e.g. nnU-Net trained on the other scans) is part of the issue's comparison but "
            "was **not run** for this report (no supervised.json beside accuracy.json). "
            "`python -m benchmarks.supervised.run` trains a MONAI 2D U-Net on CHAOS (2-fold cross-validation, "
            "time-bounded on the CPU) and writes it; `--report-only` then adds it here.",
            "",
        ]
    lines += [
        "## Wall time",
        "",
        "| method | protocol | dataset | total s | s per scan (mean) | runs |",
        "|---|---|---|---|---|---|",
    ]
    timing = OrderedDict()
    for r in records:
        key = (r["method"], r["protocol"], r["dataset"])
        timing.setdefault(key, []).append(r["seconds"])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    for (method, protocol, dataset), seconds in sorted(timing.items(),
                                                       key=lambda kv: (kv[0][1], kv[0][2], order.get(kv[0][0], 99))):
        lines.append(f"| {method} | {protocol} | {dataset} | {sum(seconds):.1f} | {np.mean(seconds):.1f} "
                     f"| {len(seconds)} |")
    for dataset, seconds in run.get("encoding_seconds", {}).items():
        lines.append(f"| image encoding (shared, cached) | – | {dataset} | {sum(seconds.values()):.1f} | "
                     f"{np.mean(list(seconds.values())):.1f} | {len(seconds)} |")
    lines += ["", "Encoding times near zero mean the embeddings came from the persistent cache.", ""]
    if result.get("plot"):
        lines += ["## Dice against the number of labelled slices", "", f"![Dice vs k]({result['plot']})", ""]
        if group(records, protocol=3):
            lines += [f"The last panel ({PROTOCOL3_TITLE}) is protocol 3: x = the number of training scans whose "
                      "every slice was labelled; the U-Net's points average only the query scans of the folds it "
                      "was trained on at that size (counts in the protocol-3 table).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plot (matplotlib: the `bench` extra)

COLOURS = {  # matplotlib's tab10, so a method keeps its colour in every figure
    FEWSHOTSAM: "tab:red",
    FEWSHOTSAM_NO_TUNING: "tab:orange",
    FEWSHOTSAM_NO_BLEND: "tab:olive",
    FEWSHOTSAM_NO_ZOOM: "tab:pink",
    FEWSHOTSAM_NO_THIN: "tab:cyan",
    FILL: "tab:blue",
    GROW: "tab:green",
    SAM_BOX: "tab:purple",
    SAM_POINT: "tab:brown",
}
LINE_STYLES = {"circle": ("-", "o"), "square": ("-", "s"), "dashed": ("--", ""), "fine dashed": (":", "")}
PANEL_WIDTH_IN, PANEL_HEIGHT_IN, LEGEND_ROW_IN, DPI = 4.6, 3.6, 0.22, 100
PROTOCOL3_TITLE = "CHAOS across scans (protocol 3)"


def _dice_axes(axes, title: str, ticks: list, x_label: str, values: list[float]) -> None:
    """Dice (y, from a tenth below the lowest value to 1) against `ticks` (x), with a title and grid."""
    y_low = max(0.0, math.floor((min(values) - 0.05) * 10) / 10)
    axes.set_title(title, fontsize=11)
    axes.set_ylim(y_low, 1.0)
    axes.set_yticks(np.arange(y_low, 1.0 + 1e-9, 0.1))
    axes.set_xticks(ticks)
    axes.margins(x=0.08)
    axes.grid(axis="y", color="0.88")
    axes.set_axisbelow(True)
    axes.set_xlabel(x_label)
    axes.set_ylabel("Dice")


def _curve(axes, points: list[tuple[float, float]], colour, style: str) -> None:
    line_style, marker = LINE_STYLES[style]
    axes.plot([x for x, _ in points], [y for _, y in points], linestyle=line_style, marker=marker, color=colour,
              linewidth=2, markersize=6)


def _add_legend(legend: list, style: str, colour, label: str) -> None:
    """style: 'circle' or 'square' (a line with that marker), 'dashed', or 'fine dashed' (the supervised line)."""
    if (style, colour, label) not in legend:
        legend.append((style, colour, label))


def _protocol1_panel(axes, dataset: str, ds: list[dict], reference: dict | None, legend: list) -> None:
    """Dice against k; methods without labelled slices and the supervised reference as dashed horizontal lines."""
    ks = sorted({s["k"] for s in ds if s["k"] is not None})
    values = [s["dice"] for s in ds] + ([reference["dice"]] if reference else [])
    _dice_axes(axes, DATASET_TITLES.get(dataset, dataset), ks, "labelled slices per structure (k)", values)
    for method in METHOD_ORDER:
        points = sorted((s["k"], s["dice"]) for s in ds if s["method"] == method and s["k"] is not None)
        flat = [s["dice"] for s in ds if s["method"] == method and s["k"] is None]
        colour = COLOURS.get(method, "black")
        if points:
            _curve(axes, points, colour, "circle")
        if flat:
            axes.axhline(flat[0], color=colour, linestyle=LINE_STYLES["dashed"][0], linewidth=2)
        if method in K_INDEPENDENT and flat:
            _add_legend(legend, "dashed", colour, f"{method}, every slice")
        elif points:
            _add_legend(legend, "circle", colour, method)
    if reference:
        axes.axhline(reference["dice"], color=SUPERVISED_COLOUR, linestyle=LINE_STYLES["fine dashed"][0], linewidth=2)
        _add_legend(legend, "fine dashed", SUPERVISED_COLOUR,
                    f"Supervised U-Net on {reference['dataset'].upper()}, {reference['training_text']}")


def _protocol3_panel(axes, p3: list[dict], supervised: dict | None, legend: list) -> None:
    """Dice against the number of training scans (all their slices): FewShotSAM, and the supervised U-Net's
    data-size curve on the same query scans."""
    sizes = sorted({s["train_size"] for s in p3})
    curves = [(f"{method}, all slices of n scans", COLOURS[method],
               sorted((s["train_size"], s["dice"]) for s in p3 if s["method"] == method))
              for method in (FEWSHOTSAM, FEWSHOTSAM_NO_TUNING)]
    supervised_points = []
    for n in sizes:
        scans = {scan for s in p3 if s["train_size"] == n for scan in s["scans"]}
        dice = _mean([_scan_mean_dice(r) for r in supervised_on_scans(supervised, n, scans)])
        if dice is not None:
            supervised_points.append((n, dice))
    curves.append(("Supervised U-Net, all slices of n scans", SUPERVISED_COLOUR, supervised_points))
    curves = [curve for curve in curves if curve[2]]
    values = [dice for _, _, points in curves for _, dice in points]
    _dice_axes(axes, PROTOCOL3_TITLE, sizes, "training scans n (every slice labelled)", values)
    for label, colour, points in curves:
        _curve(axes, points, colour, "square")
        _add_legend(legend, "square", colour, label)


def _legend_handles(legend: list) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=colour, linestyle=LINE_STYLES[style][0], marker=LINE_STYLES[style][1],
                   linewidth=2, markersize=6) for style, colour, _ in legend]


def plot_dice_vs_k(rows: list[dict], path: Path, supervised: dict | None = None) -> Path | None:
    """One panel per dataset (protocol 1): mean Dice against k labelled slices per structure, one line per method;
    then, when protocol 3 ran, one panel of CHAOS Dice against the number of fully labelled training scans.

    Methods without labelled slices (the prompted-SAM baselines) are drawn as dashed horizontal lines; so is the
    supervised reference (``supervised``: the content of supervised.json, or None), on its dataset's panel. Its
    data-size curve goes on the protocol-3 panel, on the same query scans as FewShotSAM's. The legend sits below
    the panels, in as many rows as it needs. Written atomically.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the accuracy plot needs matplotlib: pip install -e '.[bench]'") from error

    reference = supervised_reference(supervised)
    p1 = [s for s in rows if s["protocol"] == 1 and s["dice"] is not None]
    p3 = [s for s in rows if s["protocol"] == 3 and s["dice"] is not None]
    datasets = list(OrderedDict.fromkeys(s["dataset"] for s in p1))
    if not datasets and not p3:
        return None
    n_panels = len(datasets) + (1 if p3 else 0)
    figure = Figure(figsize=(PANEL_WIDTH_IN * n_panels, PANEL_HEIGHT_IN), dpi=DPI)  # no pyplot: no global state
    panels = figure.subplots(1, n_panels, squeeze=False)[0]
    legend = []
    for axes, dataset in zip(panels, datasets):
        _protocol1_panel(axes, dataset, [s for s in p1 if s["dataset"] == dataset],
                         reference if reference and reference["dataset"] == dataset else None, legend)
    if p3:
        _protocol3_panel(panels[-1], p3, supervised, legend)
    columns = max(1, min(3, int(PANEL_WIDTH_IN * n_panels * DPI) // 320))
    legend_height = LEGEND_ROW_IN * ((len(legend) + columns - 1) // columns) + 0.1
    figure.set_size_inches(PANEL_WIDTH_IN * n_panels, PANEL_HEIGHT_IN + legend_height)
    figure.subplots_adjust(left=0.55 / (PANEL_WIDTH_IN * n_panels), right=0.98, wspace=0.28, top=1 - 0.4 / (
        PANEL_HEIGHT_IN + legend_height), bottom=(legend_height + 0.55) / (PANEL_HEIGHT_IN + legend_height))
    figure.legend(_legend_handles(legend), [label for _, _, label in legend], loc="lower left", ncol=columns,
                  frameon=False, fontsize=9, bbox_to_anchor=(0.01, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format=path.suffix.lstrip(".")))
