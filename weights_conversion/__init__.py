"""Conversion of DINOv2 weights between PyTorch checkpoints and lasegjax's Flax encoder.

  python -m weights_conversion.to_flax --src dinov2_vits14_pretrain.pth --out weights/vits14
  python -m weights_conversion.to_torch --checkpoint runs/small --out export/small

Modules:
  mapping: the one table of PyTorch key, Flax path and transform, run in both directions.
  spec: architecture and position-embedding resize recipe of a source checkpoint.
  sources: readers for torch-hub files and Hugging Face folders.
  checkpoint: writing and reading the converted orbax checkpoint.
  torch_model: a PyTorch version of the whole segmenter, for inference.
"""
