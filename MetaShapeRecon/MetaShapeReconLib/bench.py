"""Benchmark: our reconstruction beside Fill between slices and signed-distance interpolation.

    python -m MetaShapeReconLib.bench [--short] [--prior kidney] [--device auto|cpu|cuda]
                                      [--threads N] [--data DIR] [--truth FILE] [--repeats N]

Prints, in one run and on the same inputs (a real shape on a 1 mm 128^3 grid, sparse planes
every w-th sagittal slice), markdown tables of time and Dice against the complete truth:
ours after 1 step and after the prior's default steps, Fill between slices (ITK morphological
contour interpolation, as in 3D Slicer) and shape-based interpolation of signed distances.
Times exclude file loading and count from the arrays in memory to the full-grid result; the
first call and the median of the warm calls are both shown. It also prints the network
evaluations of coarse-to-fine against dense evaluation, a large output grid (512 x 512 x 600)
reconstructed in a subprocess with its peak memory, and, when CUDA is available, GPU timings.

`--short` (CI) is the same with fewer repeats and settings, and asserts nothing about time.
Without a loadable prior, `--short` times an untrained SIREN instead (Dice then meaningless).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from itertools import product
from typing import Callable, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry
from .resample import centred_grid, resample_smooth

CROP_SIZE = 128
CROP_SPACING_MM = 1.0
LARGE_SIZE = (512, 512, 600)
UNTRAINED_NOTE = "untrained SIREN (prior.initial_prior): timing only, Dice meaningless"


# --- inputs -----------------------------------------------------------------------------------

def _here() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def sample_truth_path() -> Optional[str]:
    """The bundled sample's complete segmentation, in the source tree or the Slicer module."""
    for root in (os.path.join(_here(), "..", ".."), os.path.join(_here(), "..")):
        path = os.path.normpath(os.path.join(root, "Resources", "Samples", "kidney", "truth.nii.gz"))
        if os.path.isfile(path):
            return path
    return None


def canonical_crop(image, size: int = CROP_SIZE, spacing: float = CROP_SPACING_MM) -> Tuple[np.ndarray, Geometry]:
    """A binary SimpleITK image's largest connected structure, resampled through its signed
    distance (smooth even from thick slices) onto an LPS-aligned grid of `size`^3 voxels of
    `spacing` mm centred on the structure's bounding box. Returns the (i, j, k) mask and grid."""
    import SimpleITK as sitk

    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.Cast(image > 0, sitk.sitkUInt8)),
                                       sortByObjectSize=True)
    largest = sitk.Cast(components == 1, sitk.sitkUInt8)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(largest)
    if not statistics.HasLabel(1):
        raise InputError("the truth segmentation is empty")
    box = statistics.GetBoundingBox(1)
    margin = 4
    low = [max(0, b - margin) for b in box[:3]]
    high = [min(n, b + e + margin) for n, b, e in zip(largest.GetSize(), box[:3], box[3:])]
    cropped = sitk.RegionOfInterest(largest, [h - lo for h, lo in zip(high, low)], low)
    first = np.array(box[:3], float)
    last = first + np.array(box[3:], float) - 1
    corners = [largest.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.where(m, last, first)])
               for m in np.ndindex(2, 2, 2)]
    centre = (np.min(corners, axis=0) + np.max(corners, axis=0)) / 2.0
    grid = centred_grid(centre, [size * spacing] * 3, spacing)
    return resample_smooth(cropped, grid), grid


def _kits_case(data_dir: str) -> Optional[Tuple[str, str]]:
    """The first KiTS19 case with slices of at most 1.5 mm (smooth truth at 1 mm)."""
    import SimpleITK as sitk

    root = os.path.join(data_dir, "kits19")
    if not os.path.isdir(root):
        return None
    for case in sorted(os.listdir(root)):
        path = os.path.join(root, case, "segmentation.nii.gz")
        if not os.path.isfile(path):
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        if max(reader.GetSpacing()) <= 1.5:
            return case, path
    return None


def synthetic_truth() -> Tuple[np.ndarray, Geometry]:
    """A kidney-sized ellipsoid (radii 28 x 24 x 50 mm) on the 1 mm 128^3 grid."""
    geometry = Geometry.create([CROP_SIZE] * 3, [CROP_SPACING_MM] * 3)
    axes = [np.arange(CROP_SIZE, dtype=np.float32) - (CROP_SIZE - 1) / 2.0] * 3
    i, j, k = np.meshgrid(*axes, indexing="ij", sparse=True)
    mask = (i / 28.0) ** 2 + (j / 24.0) ** 2 + (k / 50.0) ** 2 <= 1.0
    return mask, geometry


def load_truth(data_dir: Optional[str], truth_path: Optional[str] = None) -> Tuple[np.ndarray, Geometry, str]:
    """The complete shape the benchmark cuts planes from: `truth_path` (a labelmap of the prior's
    own anatomy), else the bundled sample, else a KiTS19 case from `data_dir`, else a synthetic
    ellipsoid; with a sentence saying which."""
    import SimpleITK as sitk

    from .labelmap_io import labelmap_image, read_labelmap

    def cropped(labels: np.ndarray, geometry: Geometry) -> Tuple[np.ndarray, Geometry]:
        return canonical_crop(labelmap_image((labels != 0).astype(np.uint8), geometry))

    if truth_path:
        labels, geometry = read_labelmap(truth_path)  # InputError for a missing or unreadable file
        if not labels.any():
            raise InputError(f"--truth {truth_path}: the segmentation is empty")
        return (*cropped(labels, geometry), f"{truth_path}, resampled to a 1 mm {CROP_SIZE}^3 crop")
    path = sample_truth_path()
    if path:
        labels, geometry = read_labelmap(path)
        if geometry.size == (CROP_SIZE,) * 3 and np.allclose(geometry.spacing, CROP_SPACING_MM):
            return labels != 0, geometry, f"bundled sample {path}"
        return (*cropped(labels, geometry), f"bundled sample {path}, resampled to a 1 mm {CROP_SIZE}^3 crop")
    if data_dir:
        found = _kits_case(data_dir)
        if found:
            case, path = found
            mask, geometry = canonical_crop(sitk.ReadImage(path))
            return mask, geometry, (f"KiTS19 {case} (kidney + tumour, largest structure; CC BY-NC-SA 4.0), "
                                    f"resampled to a 1 mm {CROP_SIZE}^3 crop")
    mask, geometry = synthetic_truth()
    return mask, geometry, "synthetic ellipsoid 28 x 24 x 50 mm (no sample, no $METASHAPERECON_DATA/kits19)"


def load_bench_prior(name: str, short: bool):
    """(prior, note, trained). Without a loadable prior: an untrained SIREN in --short mode only."""
    from .prior import initial_prior, load_prior

    try:
        prior = load_prior(name)
        return prior, f"{prior.name} ({prior.path})", True
    except InputError as error:
        if not short:
            raise InputError(f"{error}. The full benchmark needs a trained prior (--prior NAME|PATH); "
                             "--short times an untrained network instead") from None
        print(f"NOTE: no prior could be loaded ({error}).", flush=True)
        print(f"NOTE: using an {UNTRAINED_NOTE}.", flush=True)
        return initial_prior("untrained-siren", 128.0), UNTRAINED_NOTE, False


def sparse_input(truth: np.ndarray, geometry: Geometry, axis_name: str, step: int):
    """The drawing: the truth on the planes `axis_name`:step:step//2 and nothing elsewhere."""
    from .planes import keep_drawn_planes, parse_slices, planes_from_rules

    spec = f"{axis_name}:{step}:{step // 2}"
    planes = planes_from_rules(parse_slices(spec), geometry)
    return keep_drawn_planes(np.zeros(truth.shape, dtype=np.uint8), truth, planes), planes, spec


# --- measuring --------------------------------------------------------------------------------

def _timed(function: Callable, repeats: int, synchronize: Optional[Callable] = None):
    """(first call s, median of the following calls s, last result)."""
    times, result = [], None
    for _ in range(1 + repeats):
        started = time.perf_counter()
        result = function()
        if synchronize:
            synchronize()
        times.append(time.perf_counter() - started)
    return times[0], float(np.median(times[1:])), result


def _fmt_dice(value: Optional[float], trained: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if trained else "n/a"


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f}"
    from .pipeline import native_bfloat16

    bfloat16 = "native bfloat16" if native_bfloat16() else "no native bfloat16"
    return (f"{cpu}, {os.cpu_count()} logical CPUs ({bfloat16}){memory}{load}; Python {platform.python_version()}, "
            f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)")


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- sections ---------------------------------------------------------------------------------

def compare_methods(truth, geometry, prior, trained: bool, settings, repeats: int, device: str = "cpu"):
    """Rows of the main table: ours (1 step, default steps; in float32 too where the default
    precision is another; the network alone too where the card weighs interpolation in), Fill
    between slices, SDF interpolation."""
    import torch

    from .baselines import fill_between_slices, signed_distance_interpolation
    from .pipeline import dice, reconstruct, resolve_precision

    precisions = ["auto"] + (["float32"] if resolve_precision("auto", torch.device(device)) != torch.float32 else [])
    rows = []
    for axis_name, step in settings:
        sparse, planes, spec = sparse_input(truth, geometry, axis_name, step)
        step_counts = [1] + ([prior.default_steps] if prior.default_steps != 1 else [])
        runs = [(steps, precision, None) for steps, precision in product(step_counts, precisions)]
        if prior.adaptation["interpolation_weight"] > 0:  # the card's interpolation against the network alone
            runs.insert(runs.index((step_counts[-1], "auto", None)) + 1, (step_counts[-1], "auto", 0.0))
        for steps, precision, interpolation in runs:
            call = partial(reconstruct, sparse, geometry, prior, steps=steps, slices=spec, device=device,
                           precision=precision, interpolation=interpolation)
            first, median, result = _timed(call, repeats)
            timings = result.report["timings_s"]
            variant = (" + interpolation" if result.report["interpolation"]["logits_per_mm"] > 0
                       else ", network alone" if interpolation == 0 else "")
            rows.append([f"ours, {steps} step{'s' if steps != 1 else ''}, {result.report['precision']}{variant}", spec,
                         f"{median:.3f}", f"{first:.3f}", f"{timings['adapt']:.3f} + {timings['evaluate']:.3f}",
                         _fmt_dice(dice(result.labels, truth), trained),
                         f"{result.report['evaluation']['network_evaluations']:,}"])
            print(f"  measured ours {steps} step(s) in {result.report['precision']} on {spec}", flush=True)
        for name, method in (("Fill between slices", fill_between_slices),
                             ("signed-distance interpolation", signed_distance_interpolation)):
            first, median, output = _timed(partial(method, sparse, planes, geometry), repeats)
            rows.append([name, spec, f"{median:.3f}", f"{first:.3f}", "-", _fmt_dice(dice(output, truth)), "-"])
            print(f"  measured {name} on {spec}", flush=True)
    header = ["method", "planes", "median s", "first call s", "adapt + evaluate s", "Dice", "network evaluations"]
    return _table(header, rows)


def compare_evaluation(truth, geometry, prior, trained: bool, spec: str, steps: int, repeats: int):
    """Coarse-to-fine against dense evaluation of the same adapted network."""
    from .pipeline import dice, reconstruct

    sparse, _, _ = sparse_input(truth, geometry, *_parse_setting(spec))
    results, rows = {}, []
    for method, count in (("coarse-to-fine", repeats), ("dense", 1)):
        times = []
        for _ in range(count):
            result = reconstruct(sparse, geometry, prior, steps=steps, slices=spec, device="cpu", evaluation=method)
            times.append(result.report["timings_s"]["evaluate"])
        results[method] = result
        rows.append([method, f"{result.report['evaluation']['network_evaluations']:,}",
                     f"{float(np.median(times)):.3f}", _fmt_dice(dice(result.labels, truth), trained)])
    agreement = dice(results["coarse-to-fine"].labels, results["dense"].labels)
    ratio = results["dense"].report["evaluation"]["network_evaluations"] / max(
        1, results["coarse-to-fine"].report["evaluation"]["network_evaluations"])
    table = _table(["evaluation", "network evaluations", "evaluate s (median)", "Dice vs truth"], rows)
    return table + (f"\n\nCoarse-to-fine vs dense: Dice {agreement:.5f} between the two outputs, "
                    f"{ratio:.1f}x fewer network evaluations ({spec}, {steps} step(s)).")


def _parse_setting(spec: str) -> Tuple[str, int]:
    axis, step, _ = spec.split(":")
    return axis, int(step)


def large_grids(truth, geometry, prior_spec: str, spacings, threads: int) -> str:
    """Each output grid reconstructed in a fresh subprocess, measuring its peak RSS."""
    sparse, _, spec = sparse_input(truth, geometry, "sagittal", 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="metashaperecon-bench-") as folder:
        np.save(os.path.join(folder, "sparse.npy"), sparse)
        for spacing, size in spacings:
            centre = geometry.index_to_physical(np.array([(n - 1) / 2.0 for n in geometry.size]))
            origin = centre - spacing * (np.asarray(size) - 1) / 2.0
            job = {"geometry": geometry.to_dict(), "slices": spec, "prior": prior_spec, "threads": threads,
                   "output": Geometry.create(size, [spacing] * 3, origin).to_dict()}
            with open(os.path.join(folder, "job.json"), "w") as handle:
                json.dump(job, handle)
            command = [sys.executable, "-m", "MetaShapeReconLib.bench", "--large-child", folder]
            path = os.pathsep.join(p for p in (os.path.dirname(_here()), os.environ.get("PYTHONPATH")) if p)
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path))
            if done.returncode != 0:
                rows.append([f"{size[0]} x {size[1]} x {size[2]}", f"{spacing:g}", "failed", "-", "-", "-", "-",
                             done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"])
                continue
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            voxels = int(np.prod(size))
            rows.append([f"{size[0]} x {size[1]} x {size[2]}", f"{spacing:g}", f"{voxels / 1e6:.1f} M",
                         f"{measured['evaluations']:,}", f"{measured['evaluations'] / voxels * 100:.2f} %",
                         f"{measured['seconds']:.2f} ({measured['evaluate']:.2f})",
                         f"{measured['peak_rss_mib']:.0f} ({measured['baseline_rss_mib']:.0f})",
                         f"{measured['foreground'] / 1e6:.2f} M"])
            print(f"  measured output grid {size} at {spacing:g} mm", flush=True)
    header = ["output grid", "spacing mm", "voxels", "network evaluations", "evaluated share",
              "total s (evaluate s)", "peak RSS MiB (RSS before)", "foreground voxels"]
    return _table(header, rows)


def _memory_status(field: str) -> Optional[float]:
    """A /proc/self/status memory field in bytes (Linux: VmRSS now, VmHWM peak), or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> float:
    # VmHWM belongs to this process image; ru_maxrss survives exec and would include the parent's
    peak = _memory_status("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1.0 if sys.platform == "darwin" else 1024.0)
    return peak


def _large_child(folder: str) -> int:
    """Reconstruct one large grid (a subprocess of `large_grids`) and print one JSON line."""
    import torch

    from .pipeline import reconstruct
    from .prior import initial_prior, load_prior

    with open(os.path.join(folder, "job.json")) as handle:
        job = json.load(handle)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    sparse = np.load(os.path.join(folder, "sparse.npy"))
    g, o = job["geometry"], job["output"]
    geometry = Geometry.create(g["size"], g["spacing"], g["origin"], g["direction"])
    output = Geometry.create(o["size"], o["spacing"], o["origin"], o["direction"])
    prior = initial_prior("untrained-siren", 128.0) if job["prior"] == "untrained" else load_prior(job["prior"])
    baseline = _memory_status("VmRSS") or _peak_rss_bytes()
    started = time.perf_counter()
    result = reconstruct(sparse, geometry, prior, steps=1, slices=job["slices"], device="cpu", output_geometry=output)
    seconds = time.perf_counter() - started
    peak = _peak_rss_bytes()
    print(json.dumps({"seconds": seconds, "evaluate": result.report["timings_s"]["evaluate"],
                      "evaluations": result.report["evaluation"]["network_evaluations"],
                      "foreground": int(result.report["output"]["foreground_voxels"]),
                      "peak_rss_mib": peak / 2**20, "baseline_rss_mib": baseline / 2**20}))
    return 0


def gpu_section(truth, geometry, prior, trained: bool, device: str, repeats: int) -> str:
    import torch

    from .pipeline import dice, reconstruct

    sparse, _, spec = sparse_input(truth, geometry, "sagittal", 8)
    rows = []
    for steps in sorted({1, prior.default_steps}):
        call = partial(reconstruct, sparse, geometry, prior, steps=steps, slices=spec, device=device)
        first, median, result = _timed(call, repeats, synchronize=torch.cuda.synchronize)
        timings = result.report["timings_s"]
        rows.append([f"ours, {steps} step(s)", spec, result.report["device"], f"{median * 1000:.1f}",
                     f"{first * 1000:.1f}", f"{timings['adapt'] * 1000:.1f} + {timings['evaluate'] * 1000:.1f}",
                     _fmt_dice(dice(result.labels, truth), trained)])
    return _table(["method", "planes", "device", "median ms", "first call ms", "adapt + evaluate ms", "Dice"], rows)


# --- command line -----------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MetaShapeReconLib.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="quick run for CI: fewer repeats and settings")
    parser.add_argument("--prior", default="kidney", help="bundled prior name or .safetensors path (default kidney)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: adds a GPU section when CUDA is used")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--data", default=os.environ.get("METASHAPERECON_DATA", ""),
                        help="shared data folder with kits19/ (default $METASHAPERECON_DATA)")
    parser.add_argument("--truth", default="", help="a complete segmentation of the prior's anatomy to cut the "
                        "planes from (default: the bundled kidney sample)")
    parser.add_argument("--repeats", type=int, default=0, help="warm calls per measurement (default 7, short 3)")
    parser.add_argument("--large-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.large_child:
        return _large_child(args.large_child)
    try:
        return _run(args)
    except InputError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1


def _run(args) -> int:
    import torch

    from .pipeline import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    repeats = args.repeats or (3 if args.short else 7)
    device = resolve_device(args.device)
    truth, geometry, source = load_truth(args.data or None, args.truth or None)
    prior, prior_note, trained = load_bench_prior(args.prior, args.short)
    prior_spec = prior.path if trained else "untrained"
    settings = [("sagittal", 8)] if args.short else [("sagittal", 8), ("sagittal", 16)]

    print(f"# MetaShapeRecon benchmark{' (short)' if args.short else ''}\n")
    print(f"- machine: {machine_description()}")
    print(f"- input: {source}; {int(truth.sum()):,} foreground voxels on {geometry.size} at "
          f"{geometry.spacing[0]:g} mm")
    print(f"- prior: {prior_note}")
    print(f"- times: wall clock from arrays in memory to the full-grid result (file loading excluded); "
          f"median of {repeats} warm calls, and the first call (the first row's first call is the "
          f"process's first reconstruction)\n", flush=True)

    print("## Ours vs Fill between slices vs signed-distance interpolation (CPU, 128^3 output)\n", flush=True)
    table = compare_methods(truth, geometry, prior, trained, settings, repeats)
    print("\n" + table + "\n")
    if not trained:
        print(f"Dice of ours is n/a: {UNTRAINED_NOTE}.\n")

    print("## Network evaluations: coarse-to-fine vs dense (CPU, 128^3 output)\n", flush=True)
    print(compare_evaluation(truth, geometry, prior, trained, "sagittal:8:4", 1, repeats) + "\n")

    print("## Large output grids (CPU, 1 step, each in a fresh process)\n", flush=True)
    spacings = [(0.5, (256, 256, 300))] if args.short else [(1.0, (128, 128, 150)), (0.5, (256, 256, 300)),
                                                            (0.25, LARGE_SIZE)]
    threads = args.threads or torch.get_num_threads()
    print("\n" + large_grids(truth, geometry, prior_spec, spacings, threads) + "\n")
    print("The same structure at finer spacing: voxels grow 8x per halving, network evaluations about 4x "
          "(with the surface); memory stays bounded (blocks of 128^3 voxels, chunks of points).\n")

    if device.type == "cuda":
        print("## GPU\n", flush=True)
        print(gpu_section(truth, geometry, prior, trained, str(device), repeats) + "\n")
    elif args.device == "auto":
        print("(no CUDA device: GPU section skipped)\n")
    print(f"benchmark finished in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
