"""A small model that trains on a 2-core CPU in about 15 minutes.

Without data.root it trains on a synthetic phantom set written into the workdir:

  python -m lasegjax.main --config=configs/demo.py --workdir=runs/demo

On real LGE-MRI volumes (any supported layout):

  python -m lasegjax.main --config=configs/demo.py --workdir=runs/demo_la \
      --config.data.root=/data/LA_h5

The encoder is a 4-block, 96-wide DINOv2-style ViT trained from scratch (no pretrained
weights exist for this size), so it is not frozen. Each slice is fed with its two
neighbours as the encoder's three input channels (2.5D input), which a from-scratch
model needs more than a pretrained one.
"""

from lasegjax.config import base_config


def get_config():
    config = base_config()
    config.data.image_size = (112, 112)
    config.data.context_slices = 1
    config.data.num_threads = 2
    config.model.encoder.size = "tiny"
    config.model.encoder.frozen = False
    config.model.encoder.num_taps = 4
    config.model.decoder.channels = (64, 32, 16, 8)
    config.train.batch_size = 8
    config.train.num_steps = 1800
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 50
    config.train.dice_weight = 1.0
    config.train.log_every = 25
    config.train.eval_every = 900
    config.train.checkpoint_every = 250
    config.eval.batch_size = 44
    return config
