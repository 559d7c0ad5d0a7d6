"""Code specific to the pe_classifier bundle (networks, data matching, prediction collection, report)."""
