"""The per-view diffusion backbones, their features, and (later) the fused heads."""
