"""MONAI bundle: pulmonary embolism classification from CTPA (real or generated), chest X-ray, or both."""
