"""lasegjax: left-atrium segmentation in LGE-MRI with a DINOv2 encoder and a UNet decoder."""

__version__ = "0.1.0"
