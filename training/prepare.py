"""`prepare`: real label files -> canonical 1 mm crops (cached) + patient-level split files.

Each structure is resampled into an LPS-aligned isotropic grid centred on it, through signed
distances so thick-slice data comes out smooth instead of as staircases. Crops are cached as
bit-packed arrays, one file per shape, with an index (`shapes.json`).
"""

import glob
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from MetaShapeReconLib.labelmap_io import error_reason
from MetaShapeReconLib.resample import centred_grid, resample_smooth

from .files import read_split
from .progress import progress_bar

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# how crops are made; a cache written another way is prepared again, not resumed
RESAMPLING = "signed-distance-2"


# --- dataset layouts -> list of (case id, label file, [(shape name, label values or None)]) ---------

def _kits19(root: str, labels) -> List[Tuple[str, str, Optional[dict]]]:
    files = sorted(glob.glob(os.path.join(glob.escape(root), "case_*", "segmentation.nii.gz")))
    return [(os.path.basename(os.path.dirname(f)), f, None) for f in files]


def _msd(root: str, labels) -> List[Tuple[str, str, Optional[dict]]]:
    folder = os.path.join(root, "labelsTr")
    if not os.path.isfile(os.path.join(root, "dataset.json")):
        raise SystemExit(f"{root}: not an MSD task folder (no dataset.json)")
    files = sorted(f for f in glob.glob(os.path.join(glob.escape(folder), "*.nii.gz")) if not os.path.basename(f).startswith("."))
    return [(os.path.basename(f)[:-7], f, None) for f in files]


def _folder(root: str, labels) -> List[Tuple[str, str, Optional[dict]]]:
    cases = []
    for path in sorted(glob.glob(os.path.join(glob.escape(root), "*"))):
        name = os.path.basename(path)
        for suffix in LABEL_SUFFIXES:
            if name.endswith(suffix):
                cases.append((name[:-len(suffix)], path, None))
    return cases


def _verse(root: str, labels) -> List[Tuple[str, str, Optional[dict]]]:
    """VerSe: `*_msk.nii.gz` label files with `*_ctd.json` centroids; one shape per vertebra."""
    cases = []
    for mask in sorted(glob.glob(os.path.join(glob.escape(root), "**", "*_msk.nii.gz"), recursive=True)):
        stem = os.path.basename(mask).split("_seg-")[0]
        found = glob.glob(os.path.join(glob.escape(os.path.dirname(mask)), glob.escape(stem) + "*_ctd.json"))
        if not found:
            continue
        with open(found[0]) as handle:
            centroids = json.load(handle)
        vertebrae = sorted({int(c["label"]) for c in centroids if isinstance(c, dict) and "label" in c})
        cases.append((stem, mask, {"vertebrae": vertebrae}))
    return cases


LAYOUTS = {"kits19": _kits19, "msd": _msd, "folder": _folder, "verse": _verse}


def find_cases(data: dict) -> List[Tuple[str, str, Optional[dict]]]:
    layout = data["layout"]
    if layout not in LAYOUTS:
        raise SystemExit(f"unknown data layout {layout!r}; one of {', '.join([*LAYOUTS, 'synthetic'])}")
    if not os.path.isdir(data["root"]):
        raise SystemExit(f"data root {data['root']!r} is not a folder")
    cases = LAYOUTS[layout](data["root"], data.get("labels"))
    if data.get("max_cases"):
        cases = cases[:int(data["max_cases"])]
    if not cases:
        raise SystemExit(f"no label files found under {data['root']} for layout {layout}")
    return cases


# --- one case -> canonical crops -----------------------------------------------------------------

def shapes_of_case(case: str, path: str, extra: Optional[dict], data: dict, frame_extent) -> List[dict]:
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"a {image.GetDimension()}-D image of {image.GetNumberOfComponentsPerPixel()} component(s) "
                         "per voxel, not a 3-D labelmap")
    array = sitk.GetArrayViewFromImage(image)
    targets: List[Tuple[str, np.ndarray]] = []
    if extra and "vertebrae" in extra:
        for label in extra["vertebrae"]:
            targets.append((f"{case}_v{label}", array == label))
    else:
        labels = data.get("labels")
        binary = np.isin(array, labels) if labels else array != 0
        components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8))),
                                           sortByObjectSize=True)
        components_array = sitk.GetArrayViewFromImage(components)
        sizes = np.bincount(components_array.ravel())[1:]
        keep = [i + 1 for i, size in enumerate(sizes[:int(data["components"])])
                if size >= float(data["min_component_fraction"]) * sizes[0]]
        targets = [(f"{case}_c{index}", components_array == index) for index in keep]

    margin = float(data["margin_mm"])
    extent = np.asarray(frame_extent, float) + 2 * margin
    shapes = []
    for name, mask_kji in targets:
        found = np.nonzero(mask_kji)
        if len(found[0]) == 0:
            continue
        low = np.array([f.min() for f in found])[::-1]  # (i, j, k)
        high = np.array([f.max() for f in found])[::-1]
        corners = np.array([[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1]) for c in (low[2], high[2])])
        lps = np.array([image.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner]) for corner in corners])
        centre = (lps.min(axis=0) + lps.max(axis=0)) / 2.0
        size_mm = lps.max(axis=0) - lps.min(axis=0) + np.abs(np.asarray(image.GetSpacing()))
        crop = centred_grid(centre, extent, float(data["spacing_mm"]))
        pad = np.ceil(margin / np.asarray(image.GetSpacing())).astype(int) + 2
        lo = np.maximum(low - pad, 0)
        hi = np.minimum(high + pad + 1, np.asarray(image.GetSize()))
        component = sitk.GetImageFromArray(mask_kji[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]].astype(np.uint8))
        component.SetSpacing(image.GetSpacing())
        component.SetDirection(image.GetDirection())
        component.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
        mask = resample_smooth(component, crop)
        shapes.append({"name": name, "case": case, "source": os.path.abspath(path), "mask": mask,
                       "geometry": crop.to_dict(), "size_mm": [float(s) for s in size_mm],
                       "fits_frame": bool(np.all(size_mm <= np.asarray(frame_extent, float))),
                       "native_spacing": [float(s) for s in image.GetSpacing()]})
    return shapes


def _prepare_one(job):
    """(case, its shapes written to the cache), or (case, None, why) for a file that is no labelmap."""
    case, path, extra, data, extent, cache = job
    written = []
    try:
        shapes = shapes_of_case(case, path, extra, data, extent)
    except (RuntimeError, ValueError) as error:  # ITK's reading errors; not a 3-D labelmap
        return case, None, error_reason(error)
    for shape in shapes:
        mask = shape.pop("mask")
        file = os.path.join(cache, shape["name"] + ".npz")
        np.savez_compressed(file, packed=np.packbits(mask.ravel()), shape=np.array(mask.shape))
        shape["file"] = os.path.basename(file)
        shape["voxels"] = int(mask.sum())
        written.append(shape)
    return case, written, None


# --- splits --------------------------------------------------------------------------------------

def make_splits(cases: Iterable[str], seed: int, test: float, val: float, folds: int) -> Dict[str, object]:
    """Patient-level train/val/test split and k folds, reproducible from the seed."""
    cases = sorted(set(cases))
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_test = int(round(test * len(cases)))
    n_val = int(round(val * len(cases)))
    test_cases = sorted(order[:n_test])
    val_cases = sorted(order[n_test:n_test + n_val])
    train_cases = sorted(order[n_test + n_val:])
    fold_lists = [sorted(order[i::folds]) for i in range(folds)] if folds > 1 else []
    return {"seed": seed, "test": test_cases, "val": val_cases, "train": train_cases, "folds": fold_lists}


def prepare_synthetic(config: dict) -> Tuple[List[Tuple[str, str, Optional[dict]]], List[dict]]:
    """Cache the synthetic family (data.synthetic: count, seed) like a real dataset."""
    from .synthetic import synthetic_family

    data = config["data"]
    extent = config["frame"]["extent_mm"]
    extent = max(extent) if isinstance(extent, (list, tuple)) else extent
    settings = data.get("synthetic") or {}
    seed = config["seed"] if settings.get("seed") is None else settings["seed"]
    shapes, cases = [], []
    for case, mask, geometry in synthetic_family(int(settings.get("count", 64)), extent + 2 * float(data["margin_mm"]),
                                                 seed=int(seed)):
        np.savez_compressed(os.path.join(data["cache"], case + ".npz"), packed=np.packbits(mask.ravel()),
                            shape=np.array(mask.shape))
        found = np.argwhere(mask)
        size_mm = (found.max(axis=0) - found.min(axis=0) + 1).astype(float)
        shapes.append({"name": case, "case": case, "source": "synthetic", "file": case + ".npz",
                       "geometry": geometry.to_dict(), "size_mm": size_mm.tolist(), "fits_frame": True,
                       "native_spacing": [1.0, 1.0, 1.0], "voxels": int(mask.sum())})
        cases.append((case, "synthetic", None))
    with open(os.path.join(data["cache"], "shapes.json"), "w") as handle:
        json.dump({"frame_extent_mm": [extent] * 3, "spacing_mm": 1.0, "margin_mm": data["margin_mm"],
                   "layout": "synthetic", "root": "", "cases": [case for case, _, _ in cases], "shapes": shapes},
                  handle, indent=1)
    return cases, shapes


def prepare(config: dict, workers: int = 2) -> dict:
    data = config["data"]
    cache = data["cache"]
    extent = config["frame"]["extent_mm"]
    extent = extent if isinstance(extent, (list, tuple)) else [extent] * 3
    if data["layout"] == "synthetic":
        os.makedirs(cache, exist_ok=True)
        cases, shapes = prepare_synthetic(config)
        return _write_split(config, cases, os.path.join(cache, "shapes.json"), shapes)
    cases = find_cases(data)  # first: a wrong layout or data root leaves no cache folder behind
    os.makedirs(cache, exist_ok=True)
    index_path = os.path.join(cache, "shapes.json")
    done: Dict[str, List[dict]] = {}
    settings = crop_settings(data, extent)
    if os.path.isfile(index_path):  # resume: keep what an earlier run finished with the same settings
        try:
            with open(index_path) as handle:
                previous = json.load(handle)
        except ValueError:  # a damaged index: prepare every case again
            previous = {}
        previous = previous if isinstance(previous, dict) else {}
        unknown = [key for key in settings if key not in previous]
        changed = [f"{key} {previous[key]!r} -> {value!r}" for key, value in settings.items()
                   if key in previous and previous[key] != value]
        if not changed and not unknown:
            for shape in previous["shapes"]:
                done.setdefault(shape["case"], []).append(shape)
        elif previous.get("shapes"):
            why = (f"with other settings ({'; '.join(changed)})" if changed else
                   f"by an earlier version, which did not record {', '.join(unknown)}")
            print(f"prepare: the cache {cache} was made {why}: preparing every case again", file=sys.stderr)
    jobs = [(case, path, extra, data, extent, cache) for case, path, extra in cases if case not in done]
    paths = {case: path for case, path, _ in cases}
    bar = progress_bar(total=len(cases), initial=len(cases) - len(jobs), desc="prepare", unit="case")

    def save_index():
        shapes = [s for case, _, _ in cases for s in done.get(case, [])]
        with open(index_path + ".tmp", "w") as handle:
            json.dump(dict(settings, layout=data["layout"], root=data["root"],
                           # every case prepared, those without a structure too (the split names them);
                           # max_cases: a deliberate subset, which training takes without asking for the rest
                           cases=[case for case, _, _ in cases if case in done],
                           max_cases=int(data.get("max_cases") or 0), shapes=shapes), handle, indent=1)
        os.replace(index_path + ".tmp", index_path)

    pool = ProcessPoolExecutor(max_workers=max(1, workers))
    try:
        for case, shapes, problem in pool.map(_prepare_one, jobs):
            if problem is not None:
                raise SystemExit(f"prepare: {paths[case]}: cannot prepare it ({problem}); fix or remove the file "
                                 f"and run prepare again ({len(done)} case(s) done are kept)")
            done[case] = shapes
            bar.update(1)
            save_index()  # after every case: an interrupted run loses none
    except KeyboardInterrupt:
        raise SystemExit(f"prepare: interrupted after {len(done)} of {len(cases)} case(s); run it again to "
                         "continue") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    save_index()

    shapes = [s for case, _, _ in cases for s in done.get(case, [])]
    return _write_split(config, cases, index_path, shapes)


def crop_settings(data: dict, extent) -> dict:
    """What the cached crops depend on: a cache made with other values is prepared again."""
    return {"frame_extent_mm": list(extent), "spacing_mm": data["spacing_mm"], "resampling": RESAMPLING,
            "margin_mm": data["margin_mm"], "labels": data.get("labels"), "components": data["components"],
            "min_component_fraction": data["min_component_fraction"]}


def _write_split(config: dict, cases, index_path: str, shapes: List[dict]) -> dict:
    data = config["data"]
    split_file = data.get("split_file") or os.path.join(data["cache"], "split.json")
    case_ids = [case for case, _, _ in cases]
    if os.path.isfile(split_file):
        split = read_split(split_file)
        missing = set(case_ids) - set(split["train"]) - set(split["val"]) - set(split["test"])
        if missing:
            raise SystemExit(f"{split_file} does not assign {len(missing)} case(s), e.g. {sorted(missing)[:3]}")
    else:
        s = data["split"]
        split = make_splits(case_ids, int(config["seed"]), float(s["test"]), float(s["val"]), int(s["folds"]))
        split["dataset"] = {"layout": data["layout"], "root": data["root"]}
        os.makedirs(os.path.dirname(os.path.abspath(split_file)), exist_ok=True)
        with open(split_file, "w") as handle:
            json.dump(split, handle, indent=1)
    too_big = [s["name"] for s in shapes if not s["fits_frame"]]
    return {"cases": len(case_ids), "shapes": len(shapes), "larger_than_frame": too_big, "split_file": split_file,
            "index": index_path}
