"""Data preparation command-line tools (run as ``python -m data_prep.<tool>``)."""
