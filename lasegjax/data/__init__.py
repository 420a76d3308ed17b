"""Reading LA datasets from disk and feeding 2D slices to training and evaluation."""
