"""`metashaperecon`: headless reconstruction.

    metashaperecon reconstruct INPUT OUTPUT [--prior NAME|PATH] [--steps N|auto]
        [--slices auto | AXIS:STEP[:OFFSET]] [--label N] [--device auto|cpu|cuda]
        [--precision auto|float32|bfloat16] [--interpolation W]
        [--surface MESH] [--report REPORT.json] [--output-spacing MM] ...
    metashaperecon demo [--output-dir DIR]
    metashaperecon priors

Bad input ends with a one-line message on stderr, exit status 2 and no output file.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from typing import List, Optional

from .errors import Cancelled, InputError

EXIT_INPUT_ERROR = 2
PROGRAM = "metashaperecon"
MAX_OUTPUT_VOXELS = 2 ** 31  # --output-spacing: beyond this the output alone is gigabytes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class ProgressLine:
    """Progress on stderr: a redrawn line on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, step: int, total: int, loss: Optional[float]) -> bool:
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or step == total):
            self.last = now
            text = f"\r{PROGRAM}: {step}/{total}" + (f"  loss {loss:.4f}" if loss is not None else "")
            sys.stderr.write(text.ljust(48) + ("\n" if step == total else ""))
            sys.stderr.flush()
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROGRAM, description="Reconstruct complete 3-D shapes from sparse segmentations "
                     "with a meta-learned implicit shape prior.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rec = commands.add_parser("reconstruct", help="reconstruct a sparse labelmap",
                              description="Reconstruct the complete structure of a sparse labelmap.")
    rec.add_argument("input", help="sparse labelmap (.nii, .nii.gz, .nrrd, .seg.nrrd, .mha, .mhd)")
    rec.add_argument("output", help="output labelmap (uint8 0/1, the input's geometry)")
    add_reconstruction_options(rec)
    rec.add_argument("--surface", metavar="MESH", help="also write the surface (.vtk .vtp .stl .ply .obj, LPS)")
    rec.add_argument("--smoothing", type=int, default=15, metavar="N",
                     help="surface smoothing iterations (0: none; default 15)")
    rec.add_argument("--report", metavar="REPORT.json", help="write a JSON report")
    rec.add_argument("--quiet", action="store_true", help="no progress line and no summary")

    demo = commands.add_parser("demo", help="reconstruct the bundled sample case and compare with its truth")
    demo.add_argument("--prior", default="kidney", help="prior name or file (default: kidney)")
    demo.add_argument("--output-dir", default="demo-output", help="where to write results (default: demo-output)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")

    priors = commands.add_parser("priors", help="list the bundled priors (a broken one with its reason)")
    for command in (rec, demo, priors):  # --debug after the command too, as the internal-error text suggests
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def add_reconstruction_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", default="kidney", metavar="NAME|PATH",
                        help="a prior's name ($METASHAPERECON_PRIORS, then the bundled ones; `metashaperecon priors` lists "
                             "them) or its .safetensors or .json file (default: kidney)")
    parser.add_argument("--steps", default=None, metavar="N|auto",
                        help="adaptation steps (default: the prior's); auto: continue until converged")
    parser.add_argument("--slices", default="auto", metavar="auto|AXIS:STEP[:OFFSET]",
                        help="observed planes: auto (find the drawn planes) or AXIS:STEP[:OFFSET], "
                             "AXIS one of sagittal, coronal, axial, i, j, k; comma-separate several")
    parser.add_argument("--label", type=int, default=None, help="label value of the structure (default: all non-zero)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="network arithmetic: auto (bfloat16 on CPUs with native bfloat16, else float32), "
                             "float32 or bfloat16")
    parser.add_argument("--interpolation", type=float, default=None, metavar="W",
                        help="weight of shape-based interpolation between parallel drawn planes, in logits per mm "
                             "at 8 mm gaps (0: the network alone; default: the prior's)")
    parser.add_argument("--output-spacing", type=float, default=None, metavar="MM",
                        help="write the output on a grid this fine over the input's extent")
    parser.add_argument("--evaluation", choices=("coarse-to-fine", "dense"), default="coarse-to-fine",
                        help="output evaluation (default: coarse-to-fine)")


def run_reconstruct(args) -> dict:
    from .labelmap_io import (
        LABELMAP_SUFFIXES,
        atomic_output,
        check_storable,
        check_writable,
        error_reason,
        read_files,
        read_labelmap,
        write_labelmap,
    )
    from .pipeline import reconstruct, resolve_device
    from .planes import parse_slices
    from .prior import load_prior, resolve_prior_path
    from .surface import SURFACE_SUFFIXES, surface_from_labelmap, write_surface

    check_writable(args.output, "output", LABELMAP_SUFFIXES)
    if args.surface:
        check_writable(args.surface, "surface", SURFACE_SUFFIXES)
    if args.report:
        check_writable(args.report, "report", (".json",))
    tensor_path = resolve_prior_path(args.prior)
    read = [("the input" if i == 0 else "the input's data file", f) for i, f in enumerate(read_files(args.input))]
    read += [("the prior", tensor_path), ("the prior's model card", tensor_path[:-len(".safetensors")] + ".json")]
    check_distinct(read, [("output", args.output), ("--surface", args.surface), ("--report", args.report)])
    spacing = args.output_spacing
    if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
        raise InputError(f"--output-spacing {spacing}: expected a finite positive number of millimetres")
    if args.smoothing < 0:
        raise InputError(f"--smoothing {args.smoothing}: expected 0 (none) or more iterations")
    parse_slices(args.slices)  # a bad rule fails before any work

    started = time.perf_counter()
    resolve_device(args.device)  # fail before any work when the device is not there
    prior = load_prior(args.prior)  # first: says so when no prior is available at all
    labels, geometry = read_labelmap(args.input)
    check_storable(args.output, geometry)
    loaded = time.perf_counter()
    output_geometry = None
    if spacing:
        voxels = math.prod(max(1.0, n * s / spacing) for n, s in zip(geometry.size, geometry.spacing))
        if voxels > MAX_OUTPUT_VOXELS:
            raise InputError(f"--output-spacing {spacing}: the output grid would hold about {voxels:.3g} voxels, "
                             f"more than {MAX_OUTPUT_VOXELS:,}; choose a coarser spacing")
        output_geometry = geometry.resampled(spacing)
        if min(output_geometry.size) < 2:
            raise InputError(f"--output-spacing {spacing}: coarser than the image (a grid of {output_geometry.size} "
                             "voxels); choose a finer spacing")
    result = reconstruct(labels, geometry, prior, steps=args.steps, slices=args.slices, label=args.label,
                         device=args.device, output_geometry=output_geometry, evaluation=args.evaluation,
                         progress=ProgressLine(not args.quiet), precision=args.precision,
                         interpolation=args.interpolation)
    surface_started = time.perf_counter()
    polydata = surface_from_labelmap(result.labels, result.geometry, args.smoothing) if args.surface else None
    surfaced = time.perf_counter()

    report = result.report
    report["input"] = os.path.abspath(args.input)
    report["output"]["path"] = os.path.abspath(args.output)
    report["timings_s"].update(load=loaded - started, surface=surfaced - surface_started)
    try:
        with ExitStack() as outputs:  # every file lands together, or none does
            # entered in reverse: the stack moves the last entered first, so the labelmap lands first and a
            # failure to move it leaves neither surface nor report
            report_path = outputs.enter_context(atomic_output(args.report)) if args.report else None
            surface_path = outputs.enter_context(atomic_output(args.surface)) if polydata is not None else None
            write_labelmap(outputs.enter_context(atomic_output(args.output)), result.labels, result.geometry,
                           atomic=False)
            if polydata is not None:
                write_surface(surface_path, polydata, atomic=False)
                report["surface"] = {"path": os.path.abspath(args.surface), "triangles": polydata.GetNumberOfCells()}
            report["timings_s"]["total"] = time.perf_counter() - started
            if report_path:
                with open(report_path, "w") as handle:
                    json.dump(report, handle, indent=2)
    except (OSError, RuntimeError) as error:  # a full disk, a file system's limits: nothing has landed
        raise InputError(f"could not write the outputs ({error_reason(error)}); none was written") from None
    return report


def check_distinct(inputs, outputs) -> None:
    """Refuse an output that would replace a file the run reads (`inputs`: (what, path)) or
    another output. A labelmap output counts with its data file (.mhd, .nhdr)."""
    from .labelmap_io import written_files

    seen = {}
    for kind, path in inputs:
        seen.setdefault(os.path.realpath(path), kind)
    for kind, path in outputs:
        if not path:
            continue
        for file in written_files(path) if kind == "output" else [path]:
            real = os.path.realpath(file)
            same = seen.get(real)
            if same is None and os.path.exists(file):  # hard links and case-insensitive file systems
                same = next((name for other, name in seen.items() if os.path.exists(other)
                             and os.path.samefile(other, file)), None)
            if same is not None:
                detail = "" if file == path else f" (its data file {file})"
                raise InputError(f"{kind} {path}{detail} is the same file as {same}; name another file")
            seen[real] = kind


def summary(report: dict) -> str:
    planes = ", ".join(f"{p['count']} {p['axis']}" for p in report["observed_planes"])
    t = report["timings_s"]
    interpolation = report.get("interpolation", {})
    interpolated = (f", with interpolation ({interpolation['logits_per_mm']:.3g} logits/mm)"
                    if interpolation.get("logits_per_mm") else "")
    return (f"{report['prior']} prior, {report['steps']} step(s) on {report['device']}, {report['precision']}"
            f"{interpolated}; observed planes: {planes}; "
            f"Dice on drawn planes {report['dice_observed_planes']:.3f}; "
            f"adapt {t['adapt']:.3f} s, evaluate {t['evaluate']:.3f} s, total {t.get('total', 0):.2f} s")


def run_priors() -> None:
    from .prior import bundled_prior_dirs, list_bundled_priors, load_prior

    priors = list_bundled_priors()
    if not priors:
        print(f"no prior is bundled yet (searched: {', '.join(bundled_prior_dirs()) or 'nothing'})")
        return
    for name, path in priors.items():  # a broken prior is listed with its reason; the others still are
        try:
            card = load_prior(path).card
        except InputError as error:
            print(f"{name:14s} BROKEN: {error}")
            continue
        print(f"{name:14s} {card.get('anatomy', ''):14s} steps={card.get('adaptation', {}).get('steps')}  {path}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "reconstruct":
            report = run_reconstruct(args)
            for warning in report["warnings"]:
                print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)
            if not args.quiet:
                print(summary(report))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.prior, args.output_dir, args.device)
        elif args.command == "priors":
            run_priors()
        return 0
    except InputError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (Cancelled, KeyboardInterrupt):
        print(f"{PROGRAM}: cancelled", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: say so in one line, trace only on request
        if args.debug:
            raise
        print(f"{PROGRAM}: internal error: {type(error).__name__}: {error} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
