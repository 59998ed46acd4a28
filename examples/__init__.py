"""Example segmenters, training and evaluation scripts built on masksd (not part of the installed package)."""
