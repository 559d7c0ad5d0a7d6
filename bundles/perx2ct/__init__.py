"""PerX2CT bundle: biplanar (PA + lateral) X-rays to a CT volume with perspective-projected features."""
