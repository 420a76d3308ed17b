"""Flax modules: the DINOv2 encoder, block fusion, the UNet decoder and the full segmenter."""
