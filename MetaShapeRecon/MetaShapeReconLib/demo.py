"""`metashaperecon demo`: reconstruct the bundled held-out kidney and compare with its truth.

Writes the reconstruction, its surface and a PNG (drawn planes, result and truth on a few
slices, and a rendering of the surface).
"""

import json
import os
import time
from typing import Optional

import numpy as np

from .errors import InputError

SAMPLE = "kidney"


def sample_dir(name: str = SAMPLE) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "..", "Resources", "Samples", name),
                      os.path.join(here, "..", "Resources", "Samples", name)):
        if os.path.isfile(os.path.join(candidate, "sparse.nii.gz")):
            return os.path.normpath(candidate)
    raise InputError(f"the bundled sample {name!r} is missing (expected Resources/Samples/{name}/sparse.nii.gz)")


def _fill_between_slices(sparse: np.ndarray, planes, geometry):
    """Slicer's Fill between slices on the same input, when slicer-core is installed: (result,
    seconds of a second call; the first pays ITK's one-time set-up, as ours pays PyTorch's)."""
    try:
        from .baselines import fill_between_slices
    except ImportError:
        return None
    try:
        fill_between_slices(sparse, planes, geometry)  # warm-up
        started = time.perf_counter()
        result = fill_between_slices(sparse, planes, geometry)
    except (ImportError, InputError):
        return None
    return result, time.perf_counter() - started


def check_output_dir(output_dir: str) -> None:
    """Refuse an output folder that cannot be made or written: a file of that name, or under one."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"--output-dir {output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"--output-dir {output_dir}: folder {existing} is not writable")


def run_demo(prior_name: str = "kidney", output_dir: str = "demo-output", device: str = "auto") -> dict:
    from .labelmap_io import read_labelmap, write_labelmap
    from .pipeline import dice, reconstruct, resolve_device, structure_mask
    from .planes import select_planes
    from .prior import load_prior
    from .surface import surface_from_labelmap, write_surface

    resolve_device(device)  # bad input fails before the folder is made
    check_output_dir(output_dir)
    folder = sample_dir()
    prior = load_prior(prior_name)
    sparse, geometry = read_labelmap(os.path.join(folder, "sparse.nii.gz"))
    truth, _ = read_labelmap(os.path.join(folder, "truth.nii.gz"))
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output-dir {output_dir}: cannot make the folder ({error.strerror or error})") from None

    reconstruct(sparse, geometry, prior, steps=1, device=device)  # warm-up: first-call costs excluded
    started = time.perf_counter()
    result = reconstruct(sparse, geometry, prior, device=device)
    seconds = time.perf_counter() - started
    surface = surface_from_labelmap(result.labels, geometry)
    ours = dice(result.labels, truth)
    planes = select_planes("auto", structure_mask(sparse), geometry)

    drawn_planes = ", ".join("{} {}".format(p["count"], p["axis"]) for p in result.report["observed_planes"])
    lines = [f"sample: {folder} ({geometry.size[0]}x{geometry.size[1]}x{geometry.size[2]} voxels, "
             f"{drawn_planes} planes drawn)",
             f"MetaShapeRecon ({prior.name} prior, {result.report['steps']} steps, {result.report['device']}, "
             f"{result.report['precision']}): "
             f"Dice {ours:.3f} in {seconds:.2f} s"]
    fill = _fill_between_slices(sparse > 0, planes, geometry)
    if fill is not None:
        lines.append(f"Fill between slices (same input):          Dice {dice(fill[0], truth):.3f} in {fill[1]:.2f} s")

    write_labelmap(os.path.join(output_dir, "reconstruction.nii.gz"), result.labels, geometry)
    write_surface(os.path.join(output_dir, "reconstruction.vtk"), surface)
    png = os.path.join(output_dir, "preview.png")
    made = save_preview(png, sparse > 0, result.labels, truth > 0, geometry, surface)
    report = dict(result.report, dice_truth=ours, seconds=seconds)
    with open(os.path.join(output_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    lines.append(f"wrote {output_dir}/reconstruction.nii.gz, reconstruction.vtk, report.json"
                 + (", preview.png" if made else " (no preview: matplotlib is not installed)"))
    print("\n".join(lines))
    return report


def _surface_triangles(surface, target: int = 6000) -> Optional[np.ndarray]:
    """(T, 3, 3) triangle corners of the surface, decimated for drawing."""
    import vtk
    from vtk.util import numpy_support

    if surface.GetNumberOfCells() == 0:
        return None
    decimate = vtk.vtkQuadricDecimation()
    decimate.SetInputData(surface)
    decimate.SetTargetReduction(max(0.0, 1.0 - target / surface.GetNumberOfCells()))
    decimate.Update()
    mesh = decimate.GetOutput()
    points = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData())
    cells = numpy_support.vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)  # triangles
    return points[cells]


def save_preview(path: str, drawn: np.ndarray, result: np.ndarray, truth: np.ndarray, geometry, surface) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    order = geometry.patient_axis_order()
    axial = order[2]
    present = np.nonzero(truth.any(axis=tuple(a for a in range(3) if a != axial)))[0]
    picks = np.linspace(present[0], present[-1], 6)[1:-1].astype(int)
    triangles = _surface_triangles(surface)
    columns = len(picks) + (1 if triangles is not None else 0)
    figure = plt.figure(figsize=(3.2 * columns, 3.6))
    axes = [figure.add_subplot(1, columns, i + 1) for i in range(len(picks))]
    for ax, index in zip(axes, picks):
        def plane(volume, index=index):  # rows along A-P, columns along L-R
            remaining = [a for a in range(3) if a != axial]
            slab = np.take(volume, index, axis=axial)
            return slab.T if remaining[0] == order[0] else slab
        ax.imshow(plane(truth), cmap="Greys", alpha=0.35, origin="upper")
        ax.contour(plane(result), levels=[0.5], colors="tab:red", linewidths=1.2)
        ax.contour(plane(truth), levels=[0.5], colors="tab:green", linewidths=1.0, linestyles="dashed")
        drawn_rows = np.nonzero(plane(drawn))
        ax.scatter(drawn_rows[1], drawn_rows[0], s=0.3, c="tab:blue")
        ax.set_title(f"axial slice {index}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if triangles is not None:  # drawn with matplotlib: no OpenGL needed on a headless machine
        from mpl_toolkits.mplot3d.art3d import Poly3DCollection

        ax3d = figure.add_subplot(1, columns, columns, projection="3d")
        ras = triangles * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS, as Slicer shows it
        normals = np.cross(ras[:, 1] - ras[:, 0], ras[:, 2] - ras[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        shade = 0.35 + 0.65 * np.clip(normals @ np.array([0.3, -0.6, 0.75]), 0, 1)
        faces = Poly3DCollection(ras, facecolors=np.outer(shade, [0.85, 0.5, 0.4]), edgecolor="none")
        ax3d.add_collection3d(faces)
        low, high = ras.reshape(-1, 3).min(axis=0), ras.reshape(-1, 3).max(axis=0)
        middle, half = (low + high) / 2, (high - low).max() / 2
        for setter, centre in zip((ax3d.set_xlim, ax3d.set_ylim, ax3d.set_zlim), middle):
            setter(centre - half, centre + half)
        ax3d.view_init(elev=10, azim=-90)  # from the front (anterior), superior up
        ax3d.set_axis_off()
        ax3d.set_title("surface (anterior view)", fontsize=9)
    figure.suptitle("blue: drawn planes (sparse input)   red: reconstruction   green dashed: truth", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
