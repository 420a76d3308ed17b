"""ViT-B/14 encoder, frozen, with the paper's training setup (448-px slices, batch 32, lr 1e-3).

  python -m lasegjax.main --config=configs/base.py --workdir=runs/base \
      --config.data.root=/data/LAScarQS2022/task2 \
      --config.model.encoder.checkpoint=weights/dinov2_vitb14
"""

from lasegjax.config import base_config


def get_config():
    config = base_config()
    config.model.encoder.size = "base"
    return config
