"""Shared library of xray2ct: volume I/O, intensity conventions, DRR projector, metrics, previews.

Every bundle imports from here; nothing in ``common`` imports from a bundle.
"""
