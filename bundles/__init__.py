"""MONAI bundles of xray2ct. Each sub-package is one bundle; its ``scripts`` hold bundle-specific code."""
