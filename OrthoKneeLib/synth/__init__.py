"""Paired training cases rendered from real knee label maps, in the manner of SynthSeg.

Public knee MRI with matching labels is out of reach, but real label maps are not: this
package maps them onto the catalog (sources.py), simulates findings on them (findings.py),
renders MR-like contrast (render.py), acquires three thick-slice series (acquire.py) and
writes cases in the documented layout (dataset.py). Every figure measured on these cases
is a figure on *synthetic images from real anatomy*, and is reported as such.
"""

from .dataset import CASE_LAYOUT, SynthConfig, read_case, synthesize
from .sources import SOURCES, LabelSource, load_source_maps

__all__ = ["CASE_LAYOUT", "SynthConfig", "read_case", "synthesize", "SOURCES", "LabelSource", "load_source_maps"]
