"""pix2pix_phase bundle: translate average-CT axial slices into phase-0 slices of a 4D CT (issue 7)."""
