"""`python -m training.sample`: cut the bundled demo case out of a held-out KiTS19 kidney.

Writes Resources/Samples/kidney/{truth,sparse}.nii.gz on the case's native CT grid (cropped
around one kidney with a margin) and the licence. The sparse input keeps the sagittal planes
every ~8 mm, as a user would draw them.
"""

import argparse
import json
import os

import numpy as np
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.labelmap_io import read_labelmap, write_labelmap

from .files import read_split

LICENSE = """Sample derived from the KiTS19 challenge data (case {case}, {component} kidney,
kidney + tumour labels merged), cropped; sparse.nii.gz keeps sagittal planes {rule}.

Source: Heller N. et al., "The KiTS19 Challenge Data: 300 Kidney Tumor Cases with Clinical
Context, CT Semantic Segmentations, and Surgical Outcomes", arXiv:1904.00445 (2019),
https://github.com/neheller/kits19

Licence: Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International
(CC BY-NC-SA 4.0), https://creativecommons.org/licenses/by-nc-sa/4.0/
This case belongs to the test split of the bundled kidney prior (training/splits/kidney.json):
the prior never saw it.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/kits19")
    parser.add_argument("--case", default="case_00191")
    parser.add_argument("--split", default="training/splits/kidney.json")
    parser.add_argument("--out", default="Resources/Samples/kidney")
    parser.add_argument("--margin-mm", type=float, default=12.0)
    parser.add_argument("--plane-mm", type=float, default=8.0)
    args = parser.parse_args(argv)
    if args.case not in read_split(args.split)["test"]:
        raise SystemExit(f"{args.case} is not in the test split {args.split}")
    from scipy import ndimage

    labels, geometry = read_labelmap(os.path.join(args.data, args.case, "segmentation.nii.gz"))
    components, count = ndimage.label(labels > 0)
    sizes = ndimage.sum(labels > 0, components, range(1, count + 1))
    kidney = components == 1 + int(np.argmax(sizes))
    found = np.argwhere(kidney)
    pad = np.ceil(args.margin_mm / np.asarray(geometry.spacing)).astype(int)
    low = np.maximum(found.min(axis=0) - pad, 0)
    high = np.minimum(found.max(axis=0) + pad + 1, geometry.size)
    truth = kidney[tuple(slice(a, b) for a, b in zip(low, high))].astype(np.uint8)
    origin = geometry.index_to_physical(low[None].astype(float))[0]
    crop = Geometry.create(truth.shape, geometry.spacing, origin, geometry.direction)

    sagittal = crop.patient_axis_order()[0]
    step = max(1, int(round(args.plane_mm / crop.spacing[sagittal])))
    drawn = np.nonzero(truth.any(axis=tuple(a for a in range(3) if a != sagittal)))[0]
    offset = int((drawn[0] + step // 2) % step)
    sparse = np.zeros_like(truth)
    index = [slice(None)] * 3
    index[sagittal] = slice(offset, None, step)
    sparse[tuple(index)] = truth[tuple(index)]

    os.makedirs(args.out, exist_ok=True)
    write_labelmap(os.path.join(args.out, "truth.nii.gz"), truth, crop)
    write_labelmap(os.path.join(args.out, "sparse.nii.gz"), sparse, crop)
    rule = f"every {step} planes ({step * crop.spacing[sagittal]:.1f} mm), --slices sagittal:{step}:{offset}"
    side = "left" if geometry.index_to_physical(found.mean(axis=0)[None])[0][0] > 0 else "right"
    with open(os.path.join(args.out, "LICENSE.txt"), "w") as handle:
        handle.write(LICENSE.format(case=args.case, component=side, rule=rule))
    with open(os.path.join(args.out, "sample.json"), "w") as handle:
        json.dump({"case": args.case, "slices": f"sagittal:{step}:{offset}", "size": list(crop.size),
                   "spacing_mm": list(crop.spacing), "license": "CC BY-NC-SA 4.0"}, handle, indent=2)
    print(f"wrote {args.out}: {crop.size} voxels at {np.round(crop.spacing, 2)} mm, sparse {rule}")


if __name__ == "__main__":
    main()
