"""Conversion of DINOv2 weights between PyTorch checkpoints and lasegjax's Flax encoder.

  python -m weights_conversion.to_flax --src dinov2_vits14_pretrain.pth --out weights/vits14
  python -m weights_conversion.to_torch --checkpoint runs/small --out export/small

`mapping` holds the one table of PyTorch key, Flax path and transform that both
directions run; `spec` infers the architecture and the position-embedding resize recipe
of a source checkpoint; `sources` reads torch-hub and Hugging Face files; `checkpoint`
writes and reads the converted orbax checkpoint; `torch_model` is a PyTorch version of
the whole segmenter for inference.
"""
