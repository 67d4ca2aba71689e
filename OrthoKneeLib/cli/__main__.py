"""`python -m OrthoKneeLib.cli`: the orthoknee command."""

from . import run

run()
