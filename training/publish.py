"""`publish`: gather evaluation folders into docs/RESULTS.md (and their plots beside it).

    python -m training publish --results kidney=runs/kidney_evaluation \
        left_atrium=runs/left_atrium_evaluation pancreas=runs/pancreas_evaluation --out docs

Each evaluation's own `results.md` (written by `evaluate`, with the command that made it) is
copied in under a heading per prior, after a headline table built from the `summary.json` files.
Priors already in `out/RESULTS.md` and not given here keep their published rows and section, so
one prior can be re-evaluated and published without the evaluation folders of the others.
"""

import json
import os
import shutil
from contextlib import ExitStack
from typing import Dict, List, Tuple

from MetaShapeReconLib.labelmap_io import atomic_output

HEADLINE_SETTINGS = ["sagittal:8", "sagittal:16", "coronal:16", "axial:16", "orthogonal", "two_orientations"]
HEADLINE = ["prior", "input", "Ours, 1 step", "Ours, default steps", "Ours, default steps + interpolation",
            "Fill between slices", "Signed-distance interpolation"]
HEADLINE_COLUMNS = len(HEADLINE)


def _cell(entry: Dict, key: str) -> str:
    value = entry.get(key)
    return "n/a" if not value else f"{value['dice']:.3f} / {value['asd_mm']:.2f}"


def published(path: str) -> Tuple[List[str], Dict[str, List[str]], Dict[str, str]]:
    """An earlier RESULTS.md: its priors in order, each one's headline rows and its section."""
    if not os.path.isfile(path):
        return [], {}, {}
    with open(path) as handle:
        text = handle.read()
    names, rows, sections = [], {}, {}
    for chunk in text.split("\n## ")[1:]:
        name, _, body = chunk.partition("\n")
        if name.startswith("Headline"):
            for line in body.splitlines():
                cells = line.split(" | ")
                if line.startswith("| ") and len(cells) > 2 and cells[0] not in ("| prior", "|---"):
                    if len(cells) == HEADLINE_COLUMNS - 1:  # published before the interpolation column
                        cells.insert(4, "n/a")
                        line = " | ".join(cells)
                    rows.setdefault(cells[0][2:], []).append(line)
        else:
            names.append(name)
            sections[name] = f"## {name}\n" + body.rstrip("\n") + "\n"
    return names, rows, sections


def read_evaluation(spec: str) -> Tuple[str, str, dict, str]:
    """`NAME=FOLDER` -> (name, folder, its summary.json, its results.md); one-line errors."""
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise SystemExit(f"--results {spec!r}: expected NAME=FOLDER (e.g. kidney=runs/kidney_evaluation)")
    try:
        with open(os.path.join(folder, "summary.json")) as handle:
            summary = json.load(handle)
        with open(os.path.join(folder, "results.md")) as handle:
            body = handle.read()
    except OSError as error:
        raise SystemExit(f"--results {spec}: {error.filename}: {error.strerror} (an evaluation folder of "
                         "`python -m training evaluate`)") from None
    except ValueError as error:
        raise SystemExit(f"--results {spec}: summary.json is not JSON ({error})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("settings"), dict):
        raise SystemExit(f"--results {spec}: summary.json has no settings (not written by `python -m training evaluate`)")
    return name, folder, summary, body


def publish(results: List[str], out: str) -> str:
    # every input read and checked before anything is written: a bad one leaves `out` as it was
    evaluations = [read_evaluation(spec) for spec in results]
    names = [name for name, _, _, _ in evaluations]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SystemExit(f"--results names {twice[0]} twice: one evaluation folder per prior")
    path = os.path.join(out, "RESULTS.md")
    earlier_names, earlier_rows, earlier_sections = published(path)
    sections, headline, copies = {}, {}, {}
    for name, folder, summary, body in evaluations:
        plot = os.path.join(folder, "dice_time.png")
        if os.path.isfile(plot):
            target = f"results_{name}_dice_time.png"
            copies[target] = plot
            body = body.replace("(dice_time.png)", f"({target})")
        for raw in ("results.csv", "transfer.csv"):  # the per-shape numbers behind the tables
            if os.path.isfile(os.path.join(folder, raw)):
                target = f"results_{name}_{raw}"
                copies[target] = os.path.join(folder, raw)
                body += f"\nPer-shape numbers: [{target}]({target})\n"
        body = body.replace("\n# ", "\n## ").replace("\n## ", "\n### ").lstrip("# ")
        sections[name] = f"## {name}\n\n" + body
        steps = summary.get("default_steps", "default")
        headline[name] = []
        for setting in HEADLINE_SETTINGS:
            entry = summary["settings"].get(setting)
            if entry:
                headline[name].append(f"| {name} | {setting} | {_cell(entry, 'ours_1_step')} | "
                                      f"{_cell(entry, 'ours_default_steps')} ({steps} steps) | "
                                      f"{_cell(entry, 'ours_interpolated')} | "
                                      f"{_cell(entry, 'fill_between_slices')} | {_cell(entry, 'sdf_interpolation')} |")
    lines = ["# Results", "",
             "Generated by `python -m training evaluate` (one folder per prior) and gathered by "
             "`python -m training publish`; the exact command of each evaluation is given in its section. "
             "Test splits are patient-level and were never seen in training (`training/splits/`). "
             "Seconds in these tables are wall-clock times taken during the evaluation runs, on the "
             "prior's whole canonical crop and on a machine shared with other jobs; reconstruction "
             "speed is benchmarked on its own in [PERFORMANCE.md](PERFORMANCE.md).", "",
             "## Headline: Dice / ASD (mm) against the whole shape, same sparse inputs", "",
             "\"+ interpolation\" is what `reconstruct` returns where parallel planes are drawn and the prior's "
             "card weighs shape-based interpolation in (`interpolation_weight`); n/a where it does not apply.", "",
             "| " + " | ".join(HEADLINE) + " |", "|---" * HEADLINE_COLUMNS + "|"]
    order = earlier_names + [name for name in sections if name not in earlier_names]
    for name in order:
        lines += headline.get(name, earlier_rows.get(name, []))
    lines.append("")
    for name in order:
        lines.append(sections.get(name) or earlier_sections[name])
    os.makedirs(out, exist_ok=True)
    with ExitStack() as outputs:  # the copies and RESULTS.md land together (RESULTS.md last), or none
        with open(outputs.enter_context(atomic_output(path)), "w") as handle:
            handle.write("\n".join(lines) + "\n")
        for target, source in copies.items():
            shutil.copyfile(source, outputs.enter_context(atomic_output(os.path.join(out, target))))
    return path
