"""ViT-g/14 encoder, frozen, with the paper's training setup (448-px slices, batch 32, lr 1e-3).

  python -m lasegjax.main --config=configs/giant.py --workdir=runs/giant \
      --config.data.root=/data/LAScarQS2022/task2 \
      --config.model.encoder.checkpoint=weights/dinov2_vitg14
"""

from lasegjax.config import base_config


def get_config():
    config = base_config()
    config.model.encoder.size = "giant"
    return config
