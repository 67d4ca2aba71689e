"""OrthoKnee's engine: knee MRI in, structures and findings out; importable without Slicer.

Heavy dependencies (torch, MONAI) are imported by the modules that need them, on first
use, so ``import OrthoKneeLib`` stays fast inside Slicer.
"""

__version__ = "0.1.0"
