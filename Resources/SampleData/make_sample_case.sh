#!/usr/bin/env bash
# Re-creates the shipped sample case from the real DESS series in ../shared/data.
# Run from the repository root with OrthoKnee installed:  bash Resources/SampleData/make_sample_case.sh
set -euo pipefail
SRC=${1:-../shared/data/dess-pykneer}
OUT=Resources/SampleData
# 1. The real sagittal 3D DESS, anti-aliased and resampled 0.3125 -> 0.625 mm in plane
#    (1.5 mm slices kept) so that it fits the repository's size budget.
orthoknee resample "$SRC" --spacing 0.625 0.625 1.5 --out "$OUT/dess_sagittal.nrrd"
# 2. Coronal and axial thick-slice reformats *of that same series* (not separate acquisitions),
#    made from the full-resolution DESS: each slice is the mean over its slab.
orthoknee reformat "$SRC" --plane coronal --in-plane 0.625 --thickness 3.0 --gap 0.3 --out "$OUT/dess_coronal_reformat.nrrd"
orthoknee reformat "$SRC" --plane axial --in-plane 0.625 --thickness 3.5 --gap 0.5 --out "$OUT/dess_axial_reformat.nrrd"
# 3. Their checksums (Slicer's SampleData module verifies the files against them).
(cd "$OUT" && sha256sum dess_sagittal.nrrd dess_coronal_reformat.nrrd dess_axial_reformat.nrrd > SHA256SUMS)
