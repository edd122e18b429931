"""Summary of a `make demo` run (``ddsm_train/run_demo.sh``): summary.json and a few lines.

Part of the end-to-end demo of Shen et al., "Deep Learning to Improve Breast Cancer Detection on
Screening Mammography" (Sci Rep 2019; arXiv 1708.09427). Reads what the demo's stages wrote in
``OUT_DIR``:

* ``logs/stage_seconds.tsv`` (``stage<TAB>seconds``, one line per stage),
* ``logs/3_patch_train.log`` (the line ``... test accuracy X, loss Y`` printed by
  ``patch_clf_train.py``) and ``logs/4_image_train.log`` (``... test AUROC X, with flips Y``),
* ``predictions/no_flips/metrics.json`` and ``predictions/flips/metrics.json``
  (``image_clf_predict.py``), ``evaluation/metrics.json`` (``evaluate.py``: the operating point
  chosen on the validation images by Youden's J, applied to the test images),

and writes ``OUT_DIR/summary.json`` with ``patch_test_accuracy``, ``test_auroc`` /
``test_auroc_ci`` (no flips), ``test_auroc_flips`` / ``test_auroc_flips_ci``, ``n_test_images``,
``operating_point`` (its threshold, test sensitivity and specificity with intervals),
``stage_seconds``, ``total_seconds``, ``roc_png``, ``heatmap_pngs`` and ``files`` (the files
of the run relative to ``OUT_DIR``, by top folder; folders of more than 20 files as a count and
the first 5), and ``OUT_DIR/files.txt`` listing every file of the run; then prints the
summary, ending with where the results are.

Usage: ``python demo_summary.py OUT_DIR``
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional, Sequence

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)
from dm_image import atomic_write  # noqa: E402

__all__ = ["run", "get_args_parser", "main"]

_PATCH_ACC = re.compile(r"test accuracy ([0-9.]+), loss ([0-9.]+)")
_IMAGE_AUC = re.compile(r"test AUROC ([0-9.]+), with flips ([0-9.]+)")


def _read_stage_seconds(path: Path) -> dict:
    times = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if "\t" in line:
                name, sec = line.split("\t", 1)
                times[name] = round(float(sec), 1)
    return times


def _search_log(path: Path, pattern: re.Pattern) -> Optional[tuple]:
    if not path.is_file():
        return None
    found = pattern.findall(path.read_text(errors="replace"))
    return tuple(float(v) for v in found[-1]) if found else None


def _read_metrics(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("image", {})


def _validation_point(path: Path) -> Optional[dict]:
    """The Youden operating point chosen on the validation images (evaluate.py), as found on
    the test images (flips), or None when the evaluation did not run or chose none."""
    if not path.is_file():
        return None
    image = json.loads(path.read_text()).get("image", {})
    point = next(iter(image.values()), {}).get("operating_points", {}).get("youden")
    if not point:
        return None
    return {k: point.get(k) for k in ("threshold", "sensitivity", "sensitivity_ci",
                                      "specificity", "specificity_ci")}


def _list_files(out: Path) -> dict:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in ("summary.json", "files.txt"):
            rel = p.relative_to(out)
            files.setdefault(rel.parts[0] if len(rel.parts) > 1 else ".", []).append(str(rel))
    return files


def _shorten_data(files: dict, max_list: int = 20) -> dict:
    """Folders with many files (images, patches) are given as a count and a few examples."""
    out = {}
    for key, names in files.items():
        out[key] = names if len(names) <= max_list else {
            "count": len(names), "first": names[:5]}
    return out


def run(out_dir: str) -> dict:
    """Collect the demo's results in ``out_dir`` into ``out_dir/summary.json``.

    Args:
        out_dir: the demo's output folder.

    Returns:
        The summary dict written to ``summary.json``.

    Raises:
        FileNotFoundError: ``out_dir`` is not a folder.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"demo output folder {out} does not exist")
    logs = out / "logs"
    times = _read_stage_seconds(logs / "stage_seconds.tsv")
    patch = _search_log(logs / "3_patch_train.log", _PATCH_ACC)
    train_auc = _search_log(logs / "4_image_train.log", _IMAGE_AUC)
    plain = _read_metrics(out / "predictions" / "no_flips" / "metrics.json")
    flips = _read_metrics(out / "predictions" / "flips" / "metrics.json")
    files = _list_files(out)
    summary = {
        "operating_point": _validation_point(out / "evaluation" / "metrics.json"),
        "out_dir": str(out.resolve()),
        "patch_test_accuracy": patch[0] if patch else None,
        "patch_test_loss": patch[1] if patch else None,
        "test_auroc": plain.get("auroc"),
        "test_auroc_ci": plain.get("auroc_ci"),
        "test_auroc_flips": flips.get("auroc"),
        "test_auroc_flips_ci": flips.get("auroc_ci"),
        "test_auprc": plain.get("auprc"),
        "test_auprc_flips": flips.get("auprc"),
        "n_test_images": plain.get("n"),
        "n_test_pos": plain.get("n_pos"),
        "image_clf_train_test_auroc": list(train_auc) if train_auc else None,
        "stage_seconds": times,
        "total_seconds": round(sum(times.values()), 1),
        "roc_png": {"no_flips": plain.get("roc_png"), "flips": flips.get("roc_png")},
        "heatmap_pngs": [str(out.resolve() / f) for f in files.get("heatmaps", [])
                         if f.endswith("_heatmap.png")],
        "files": _shorten_data(files),
    }
    summary["file_list"] = str(out.resolve() / "files.txt")
    listing = "".join(f"{name}\n" for names in files.values() for name in names)
    atomic_write(out / "files.txt", lambda fh: fh.write(listing), text=True)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda fh: fh.write(text), text=True)
    return summary


def _fmt_auc(value, ci) -> str:
    if value is None:
        return "n/a"
    ci_txt = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else ""
    return f"{value:.3f}{ci_txt}"


def _point_lines(point: Optional[dict]) -> list:
    if not point:
        return []
    return [f"  operating point chosen on validation (Youden index, threshold "
            f"{point['threshold']:.3f}), on test: sensitivity "
            f"{_fmt_auc(point['sensitivity'], point['sensitivity_ci'])}, specificity "
            f"{_fmt_auc(point['specificity'], point['specificity_ci'])}"]


def format_summary(s: dict) -> str:
    """The printed lines of the summary (last line: where the results are)."""
    acc = s["patch_test_accuracy"]
    times = ", ".join(f"{k.split('_', 1)[1]} {v:.0f}s" for k, v in s["stage_seconds"].items())
    lines = [
        "Demo summary",
        f"  patch classifier test accuracy (3 classes): "
        f"{'n/a' if acc is None else f'{acc:.3f}'}",
        f"  whole-image test AUROC ({s['n_test_images']} images, {s['n_test_pos']} positive): "
        f"{_fmt_auc(s['test_auroc'], s['test_auroc_ci'])}",
        f"  with flip augmentation: {_fmt_auc(s['test_auroc_flips'], s['test_auroc_flips_ci'])}",
        *_point_lines(s.get("operating_point")),
        f"  time per stage: {times}",
        f"  total time: {s['total_seconds']:.0f}s",
        f"  ROC curve: {s['roc_png']['flips']}",
        f"  heatmap overlays: {', '.join(Path(p).name for p in s['heatmap_pngs']) or 'none'}"
        f" in {Path(s['out_dir']) / 'heatmaps'}",
        f"Results are in {s['out_dir']} (summary.json; files.txt lists every file)",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="the demo's output folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = get_args_parser()
    args = script_utils.parse_command_line(parser, argv)
    with script_utils.exit_on_interrupt(parser):
        try:
            summary = run(**vars(args))
        except (ValueError, OSError) as err:
            script_utils.user_error_exit(parser, err)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
