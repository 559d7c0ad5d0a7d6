"""Code specific to the PerX2CT bundle (network, slice sampling, inference API, batch CLI, server)."""
