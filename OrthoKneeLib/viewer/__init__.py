"""The browser viewer (`orthoknee serve`): trame-slicer views and panels over one case."""
