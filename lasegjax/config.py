"""The default configuration that every file in `configs/` starts from.

Every field can be overridden on the command line, for example
`--config.data.root=/data/LAScarQS2022/task2 --config.train.batch_size=16`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Return the full configuration with the paper's training setup and a ViT-S/14 encoder."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # XLA's RngBitGenerator. The default threefry generator compiles very slowly on CPU
    # (about 5 s per random initialiser with jax 0.10), which dominates start-up.
    config.prng_impl = "rbg"
    # CPU devices to expose when no accelerator is present (0: one per core). The batch is
    # split over all devices.
    config.cpu_devices = 0
    # Let glibc reuse freed host buffers instead of returning them to the kernel after
    # every step (lasegjax.hostmem). CPU steps run faster, but the process keeps its peak
    # memory.
    config.host_memory_reuse = True

    # Device mesh: `data` splits the batch, `fsdp` splits the batch and the parameters and
    # optimizer state, `model` splits attention heads and MLP hidden units. One size may be
    # -1: the remaining devices.
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1
    mesh.fsdp = 1
    mesh.model = 1

    config.data = data = ml_collections.ConfigDict()
    # Empty root: generate a synthetic phantom dataset in the workdir and train on it.
    data.root = ""
    data.layout = "auto"  # "auto", "lascarqs", "msd", "la_h5" or "lasc2018"
    data.image_size = (448, 448)  # (height, width), each a multiple of the 14-px patch
    data.fit = "resize"  # "resize" stretches each slice to image_size; "pad" pads or crops
    data.slice_axis = "auto"  # 0, 1, 2, -1, or "auto": the axis with the coarsest spacing
    data.clip_percentiles = (0.5, 99.5)
    # Neighbouring slices on each side fed as extra input channels (2.5D input). 0 feeds the
    # slice alone, repeated over the encoder's three input channels, as the paper does.
    data.context_slices = 0
    data.val_fraction = 0.2
    data.num_val = 0  # if > 0, overrides val_fraction with a fixed count of volumes
    data.split_seed = 0
    # Data shards: the training volumes are dealt round-robin into this many shards, each
    # with its own shuffled stream, and batch k concatenates batch k of every shard. Each
    # process reads only its own shards. 0: one shard per process. Fix it (to a multiple of
    # the process count) to get the same batches whatever the number of hosts.
    data.shards = 0
    data.max_cases = 0  # if > 0, use only the first max_cases cases (sorted by id), for quick runs
    data.num_threads = 2  # grain reader threads
    data.prefetch = 4  # batches prepared ahead
    data.augment = aug = ml_collections.ConfigDict()
    aug.enabled = True
    aug.flip = True
    aug.rotate_deg = 10.0
    aug.scale = 0.1  # zoom factor drawn log-uniformly in [1 / 1.1, 1.1]
    aug.intensity = 0.1  # multiplicative and additive jitter, in units of the volume's std
    data.phantom = phantom = ml_collections.ConfigDict()
    phantom.num_cases = 8
    phantom.shape = (96, 96, 24)
    phantom.spacing = (1.25, 1.25, 2.5)

    config.model = model = ml_collections.ConfigDict()
    model.encoder = enc = ml_collections.ConfigDict()
    enc.size = "small"  # "tiny", "small", "base", "large" or "giant"
    enc.depth = 0  # 0: the published depth of `size`; a smaller value truncates the encoder
    enc.patch_size = 14
    enc.num_registers = 0
    enc.pos_grid = 37  # side of the stored position-embedding grid (518 px / 14)
    enc.taps = ()  # block indices to fuse; empty: num_taps blocks evenly spaced
    enc.num_taps = 4
    enc.norm_taps = True
    enc.interpolate_offset = 0.1
    enc.interpolate_antialias = False
    enc.frozen = True
    enc.checkpoint = ""  # converted DINOv2 weights; empty: random initialisation
    # Scan over the blocks between taps, so XLA compiles one block, not `depth` of them.
    enc.scan = False
    # Rematerialise each block in the backward pass: "none", "full", "dots" or "dots_no_batch"
    # (what is kept; see lasegjax/model/encoder.py). Only matters when the encoder is trained.
    enc.remat = "none"
    model.fusion = "learned"  # "learned", "last_block" or "mean"
    model.decoder = dec = ml_collections.ConfigDict()
    dec.channels = (256, 128, 64, 32)
    dec.image_integration = True

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 32
    train.num_steps = 20_000
    train.learning_rate = 1e-3
    train.warmup_steps = 500
    train.end_learning_rate_factor = 0.01
    train.weight_decay = 1e-4
    train.grad_clip_norm = 1.0
    train.bce_weight = 1.0
    train.dice_weight = 0.0  # 0 with bce_weight 1 is the paper's pure BCE loss
    train.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    train.log_every = 50
    train.eval_every = 1000
    train.checkpoint_every = 1000
    train.keep_checkpoints = 3
    train.stop_at_step = 0  # if > 0, save and exit at this step (for runs split into chunks)

    config.eval = ev = ml_collections.ConfigDict()
    ev.batch_size = 32
    ev.threshold = 0.5
    ev.largest_component = True  # keep only the largest connected component of each 3D mask
    ev.num_panel_slices = 4
    ev.save_predictions = True
    return config
