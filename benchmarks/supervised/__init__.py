"""Fully supervised reference for the accuracy benchmark: a MONAI 2D U-Net trained on every slice of other scans."""
