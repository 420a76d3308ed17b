"""Train-step time of the Flax segmenter against its PyTorch reference model, on the CPU.

  python bench/train_step_vs_torch.py
  python bench/train_step_vs_torch.py --config configs/small.py --image_size 224 --batch_size 2

Both frameworks run in this one process. The Flax side is the train step of
`lasegjax.train`: jitted, state donated, batch split over the configured CPU devices. The
PyTorch side is `weights_conversion.torch_model.TorchSegmenter`, the same architecture in
eager PyTorch. It starts from the Flax initial parameters, copied through the export
table of `weights_conversion.mapping`. Both train the same parameters (the encoder frozen
or not, as configured) on the same random batches. The loss is the same: BCE plus soft
Dice, weighted by `train.bce_weight` and `train.dice_weight`. So is the optimizer: global
gradient-norm clipping, then AdamW with the config's warmup-cosine learning rate and
weight decay on matrices and convolution kernels only.

After warm-up steps, which compile the JAX programs, the timed steps run in blocks that
alternate between the frameworks in ABBA order, so a change in machine load hits both.
Each step is timed on its own, waiting for its results. A block during which other
processes kept more than `--max_other_cpu` cores busy is run again (see `--retries`).
On a 2-core machine with another process busy, the torch 2.13 step slowed down more than
tenfold with 2 OpenMP threads, the Flax step about threefold, so such blocks would skew
the ratio. With `--breakdown` (the default) the forward pass, the forward plus backward
pass, and the encoder and the decoder alone are timed the same way, to show where a
difference comes from.
"""

import argparse
import dataclasses
import os
import statistics
import time

from report import (
    OtherCpuUse,
    add_common_flags,
    load_config,
    load_text,
    markdown_table,
    memory_text,
    parse_image_size,
    peak_rss_bytes,
    print_report,
    wait_for_low_load,
)

TORCH_OPTIMIZERS = ("default", "foreach", "fused")
RETRY_PAUSE_SECONDS = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--size", help="encoder size, replacing model.encoder.size")
    parser.add_argument("--image_size", type=parse_image_size, help="slice size N or H,W in pixels")
    parser.add_argument("--batch_size", type=int, help="slices per step (train.batch_size)")
    parser.add_argument(
        "--frozen",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="freeze the encoder in both frameworks (default: model.encoder.frozen)",
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="timed train steps per framework (default 30)"
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=6,
        help="blocks the timed steps are split into, alternating frameworks (default 6)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per framework first (default 3)"
    )
    parser.add_argument(
        "--num_batches", type=int, default=4, help="distinct random batches, cycled (default 4)"
    )
    parser.add_argument(
        "--torch_threads",
        type=int,
        default=os.cpu_count(),
        help="torch.set_num_threads (default: the core count)",
    )
    parser.add_argument(
        "--torch_optimizer",
        choices=TORCH_OPTIMIZERS,
        default="default",
        help="torch AdamW implementation: torch's default for CPU tensors (a loop over "
        "parameters), foreach or fused (default: default)",
    )
    parser.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the forward pass and the forward plus backward pass (default: on)",
    )
    parser.add_argument(
        "--max_other_cpu",
        type=float,
        default=0.25,
        help="run a block again if other processes kept more than this many cores busy "
        "during it (default 0.25)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=4,
        help="most blocks run again in each timing (train steps, breakdown) (default 4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters and batches")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error(
            f"--warmup {args.warmup} is invalid: at least 1 step compares the first losses"
        )
    if args.steps < 1 or args.blocks < 1 or args.steps % args.blocks:
        parser.error(f"--steps {args.steps} must be a positive multiple of --blocks {args.blocks}")
    return args


def build_config(args):
    config = load_config(args.config, args.override)
    if args.size:
        config.model.encoder.size = args.size
    if args.image_size:
        config.data.image_size = args.image_size
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.frozen is not None:
        config.model.encoder.frozen = args.frozen
    return config


def random_batches(config, count: int, seed: int) -> list[dict]:
    """Return NHWC float32 batches: Gaussian noise plus a centred disc of random size, and the disc
    as the mask."""
    import numpy as np

    rng = np.random.default_rng(seed)
    height, width = config.data.image_size
    channels = 2 * config.data.context_slices + 1
    batch = config.train.batch_size
    rows, cols = np.mgrid[:height, :width]
    batches = []
    for _ in range(count):
        images = rng.standard_normal((batch, height, width, channels)).astype(np.float32)
        radius = rng.uniform(0.1, 0.3, (batch, 1, 1)) * min(height, width)
        inside = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < radius**2
        masks = inside[..., None].astype(np.float32)
        batches.append({"image": images + masks, "mask": masks})
    return batches


class FlaxTrainer:
    """The lasegjax train state and jitted step, plus forward and gradient programs."""

    def __init__(self, config, seed: int):
        import jax

        from lasegjax import estimates, sharding
        from lasegjax.model.segmenter import build_model
        from lasegjax.train import compute_dtype, create_train_state, make_train_step

        self.config = config
        self.model = build_model(config.model, compute_dtype(config))
        self.mesh = sharding.make_mesh(config.get("mesh"))
        sharding.check_batch_divisible(config.train.batch_size, self.mesh, "--batch_size")
        self.state, self.tx, self.labels = create_train_state(
            config, self.model, jax.random.PRNGKey(seed), self.mesh
        )
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step = make_train_step(self.model, self.tx, self.labels, config, self.mesh, shardings)
        start = time.perf_counter()
        abstract_batch = {
            key: jax.ShapeDtypeStruct(shape, "float32", sharding=self.batch_sharding)
            for key, shape in self.batch_shapes().items()
        }
        self.step_fn = step.lower(self.state, abstract_batch).compile()
        self.compile_seconds = time.perf_counter() - start
        self.costs = estimates.compiled_costs(self.step_fn)
        self.last_loss = None

    def batch_shapes(self) -> dict:
        batch = self.config.train.batch_size
        height, width = self.config.data.image_size
        channels = 2 * self.config.data.context_slices + 1
        return {"image": (batch, height, width, channels), "mask": (batch, height, width, 1)}

    def place(self, batch: dict) -> dict:
        import jax

        return {key: jax.device_put(value, self.batch_sharding) for key, value in batch.items()}

    def initial_params(self) -> dict:
        """Return the parameters as host arrays; call before the first step donates them."""
        import jax

        return jax.device_get(self.state.params)

    def train_step(self, batch) -> None:
        import jax

        self.state, metrics = self.step_fn(self.state, batch)
        self.last_loss = float(jax.block_until_ready(metrics)["loss"])

    def counts(self) -> tuple[int, int]:
        """Return (trainable parameters, of which weight-decayed) under the optimizer's labels."""
        import jax

        from lasegjax.optim import TRAINABLE, path_string

        trainable = decayed = 0
        flat_labels = jax.tree_util.tree_leaves_with_path(self.labels)
        for (path, label), leaf in zip(
            flat_labels, jax.tree.leaves(self.state.params), strict=True
        ):
            if label != TRAINABLE:
                continue
            trainable += leaf.size
            if leaf.ndim >= 2 and path_string(path).endswith("kernel"):
                decayed += leaf.size
        return trainable, decayed

    def phase_functions(self) -> dict:
        """Return {part: callable on a placed batch}; each callable waits for its results.

        "forward" is the train step's loss, with frozen parameters passed through
        stop_gradient, and "forward+backward" the train step's own loss and gradient
        function (`lasegjax.train.loss_and_gradients`). The encoder (with block fusion)
        and the decoder are also timed apart, each with the sum of squares of its output
        as the loss. The decoder part reads the fused features from `batch["features"]`
        (see `add_features`).
        """
        import jax
        import jax.numpy as jnp

        from lasegjax.losses import segmentation_loss
        from lasegjax.optim import FROZEN
        from lasegjax.train import loss_and_gradients

        train = self.config.train

        def trainable_only(params):
            return jax.tree.map(
                lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
                params,
                self.labels,
            )

        def loss_fn(params, batch):
            logits = self.model.apply({"params": trainable_only(params)}, batch["image"])
            loss, _ = segmentation_loss(logits, batch["mask"], train.bce_weight, train.dice_weight)
            return loss

        def encoder_loss(params, batch):
            features = self.model.apply(
                {"params": trainable_only(params)}, batch["image"], method=encode
            )
            return jnp.sum(features**2)

        def decoder_loss(params, batch):
            logits = self.model.apply(
                {"params": trainable_only(params)},
                batch["features"],
                middle_channel(batch["image"]),
                method=lambda module, features, image: module.decoder(features, image),
            )
            return jnp.sum(logits**2)

        programs = {
            "forward": jax.jit(loss_fn),
            "forward+backward": jax.jit(
                loss_and_gradients(self.model, self.labels, self.config, self.mesh)
            ),
            "encoder forward+backward": jax.jit(jax.value_and_grad(encoder_loss)),
            "decoder forward+backward": jax.jit(jax.value_and_grad(decoder_loss)),
        }

        def waiting(program):
            return lambda batch: jax.block_until_ready(program(self.state.params, batch))

        return {part: waiting(program) for part, program in programs.items()}

    def add_features(self, batch: dict) -> dict:
        """Return `batch` with the fused encoder features of its images under "features"."""
        import jax

        features = jax.jit(
            lambda params, images: self.model.apply({"params": params}, images, method=encode)
        )(self.state.params, batch["image"])
        return dict(batch, features=features)


def encode(module, images):
    """Return the fused patch features of a `Segmenter` for (B, H, W, C) images."""
    import jax.numpy as jnp

    if images.shape[-1] == 1:
        images = jnp.repeat(images, module.encoder.in_channels, axis=-1)
    return module.fusion(module.encoder(images))


def middle_channel(images):
    """Return the channel that the decoder receives: the slice itself, in the middle."""
    middle = images.shape[-1] // 2
    return images[..., middle : middle + 1]


class TorchTrainer:
    """`TorchSegmenter` with the Flax parameters, trained like the Flax step."""

    def __init__(self, config, flax_model, params: dict, optimizer: str):
        import flax
        import numpy as np
        import torch

        from lasegjax.optim import learning_rate_schedule
        from weights_conversion.mapping import segmenter_rules, to_torch_state
        from weights_conversion.to_torch import segmenter_architecture
        from weights_conversion.torch_model import TorchSegmenter

        self.torch = torch
        self.config = config
        encoder = flax_model.encoder
        rules = segmenter_rules(
            encoder.depth,
            encoder.mlp,
            encoder.num_registers,
            config.model.fusion,
            len(config.model.decoder.channels),
        )
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        state = to_torch_state(rules, {k: np.asarray(v) for k, v in flat.items()})
        self.model = TorchSegmenter(segmenter_architecture(config, flax_model))
        self.model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
        self.model.train()

        frozen = config.model.encoder.frozen
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if frozen and name.startswith("encoder."):
                parameter.requires_grad_(False)
                continue
            # As lasegjax.optim: decay only matrices and convolution kernels.
            is_kernel = name.endswith(".weight") and parameter.ndim >= 2
            (decay if is_kernel else no_decay).append(parameter)
        self.trainable = decay + no_decay
        self.decayed_count = sum(p.numel() for p in decay)
        train = config.train
        kwargs = {"foreach": True} if optimizer == "foreach" else {}
        if optimizer == "fused":
            kwargs = {"fused": True}
        # optax.adamw defaults: b1 0.9, b2 0.999, eps 1e-8, decay scaled by the learning rate.
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=0.0,
            betas=(0.9, 0.999),
            eps=1e-8,
            **kwargs,
        )
        schedule = learning_rate_schedule(train)
        self._schedule = schedule
        self._rates: list[float] = []
        self.step_count = 0
        self.last_loss = None

    def prepare_rates(self, count: int) -> None:
        """Evaluate the learning-rate schedule for `count` steps ahead, outside the timing."""
        import numpy as np

        self._rates = [float(self._schedule(np.int32(i))) for i in range(count)]

    def to_tensors(self, batch: dict) -> dict:
        import numpy as np

        return {
            key: self.torch.from_numpy(np.ascontiguousarray(value.transpose(0, 3, 1, 2)))
            for key, value in batch.items()
        }

    def loss(self, batch: dict):
        torch = self.torch
        train = self.config.train
        logits = self.model(batch["image"]).float()
        masks = batch["mask"]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
        # lasegjax.losses.soft_dice_loss: the batch pooled into one overlap, smooth 1.
        probabilities = torch.sigmoid(logits)
        intersection = (probabilities * masks).sum()
        total = probabilities.sum() + masks.sum()
        dice = 1.0 - (2.0 * intersection + 1.0) / (total + 1.0)
        return train.bce_weight * bce + train.dice_weight * dice

    def train_step(self, batch: dict) -> None:
        # NOTE: the Flax step also returns parameter and update norms and the fusion
        # weights for its log, which this step does not compute; the cost is not measured.
        rate = self._rates[self.step_count]
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.trainable, self.config.train.grad_clip_norm)
        self.optimizer.step()
        self.step_count += 1
        self.last_loss = float(loss.detach())

    def forward(self, batch: dict) -> None:
        with self.torch.no_grad():
            self.loss(batch)

    def forward_backward(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch).backward()

    def encoder_input(self, images):
        if images.shape[1] == 1:
            return images.repeat(1, self.model.in_channels, 1, 1)
        return images

    def encoder_forward_backward(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        model = self.model
        features = model.fusion(model.encoder(self.encoder_input(batch["image"])))
        (features**2).sum().backward()

    def decoder_forward_backward(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        images = batch["image"]
        middle = images.shape[1] // 2
        logits = self.model.decoder(batch["features"], images[:, middle : middle + 1])
        (logits**2).sum().backward()

    def add_features(self, batch: dict) -> dict:
        """Return `batch` with the fused encoder features of its images under "features"."""
        with self.torch.no_grad():
            images = self.encoder_input(batch["image"])
            features = self.model.fusion(self.model.encoder(images))
        return dict(batch, features=features)

    def phase_functions(self) -> dict:
        """Return {part: callable on a batch}, the parts of `FlaxTrainer.phase_functions`."""
        return {
            "forward": self.forward,
            "forward+backward": self.forward_backward,
            "encoder forward+backward": self.encoder_forward_backward,
            "decoder forward+backward": self.decoder_forward_backward,
        }


@dataclasses.dataclass
class Timings:
    """Per-call times of several functions, timed in alternating blocks.

    Attributes:
      times: Seconds of each kept call, by function name.
      other_cpu: Cores that other processes kept busy during each kept block, by name.
      repeated: Blocks run again because other processes were busy, by name.
      calls: Calls made, kept or discarded, by name.
    """

    times: dict
    other_cpu: dict
    repeated: dict
    calls: dict

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def mean_other_cpu(self, name: str) -> float | None:
        values = [v for v in self.other_cpu[name] if v is not None]
        return statistics.mean(values) if values else None


def time_alternating(
    functions: dict, inputs: dict, steps: int, blocks: int, max_other: float, retries: int
) -> Timings:
    """Time `steps` calls of each function, in `blocks` blocks that alternate ABBA.

    `functions` and `inputs` map a name to a callable and to the list of arguments it
    cycles through. A block during which other processes kept more than `max_other` cores
    busy is run again after a pause, and its last run is kept. At most `retries` blocks
    run again in all, so a busy machine cannot stretch the run without bound.
    """
    names = list(functions)
    times = {name: [] for name in names}
    others = {name: [] for name in names}
    calls = dict.fromkeys(names, 0)
    repeated = dict.fromkeys(names, 0)
    per_block = steps // blocks
    monitor = OtherCpuUse()
    for block in range(blocks):
        order = names if block % 2 == 0 else names[::-1]
        for name in order:
            function, cycle = functions[name], inputs[name]
            while True:
                block_times = []
                monitor.start()
                for _ in range(per_block):
                    argument = cycle[calls[name] % len(cycle)]
                    start = time.perf_counter()
                    function(argument)
                    block_times.append(time.perf_counter() - start)
                    calls[name] += 1
                other = monitor.stop()
                if other is None or other <= max_other or sum(repeated.values()) >= retries:
                    break
                repeated[name] += 1
                time.sleep(RETRY_PAUSE_SECONDS)
            times[name] += block_times
            others[name].append(other)
    return Timings(times, others, repeated, calls)


def milliseconds(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.1f}"


def spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{1000 * low:.0f}-{1000 * high:.0f}"


def warm_up(trainer, batches: list, steps: int) -> tuple[float, float]:
    """Run `steps` untimed train steps; return (seconds, loss of the first step)."""
    start = time.perf_counter()
    first_loss = None
    for index in range(steps):
        trainer.train_step(batches[index % len(batches)])
        if index == 0:
            first_loss = trainer.last_loss
    return time.perf_counter() - start, first_loss


def time_phases(flax_trainer, torch_trainer, flax_batches, torch_batches, args) -> dict:
    """Time the parts of `FlaxTrainer.phase_functions` in both frameworks."""
    flax_parts = flax_trainer.phase_functions()
    torch_parts = torch_trainer.phase_functions()
    flax_batches = [flax_trainer.add_features(batch) for batch in flax_batches]
    torch_batches = [torch_trainer.add_features(batch) for batch in torch_batches]
    start = time.perf_counter()
    for function in flax_parts.values():
        function(flax_batches[0])
    compile_seconds = time.perf_counter() - start
    for function in torch_parts.values():
        function(torch_batches[0])

    functions, inputs = {}, {}
    for part in flax_parts:
        functions[f"flax {part}"], inputs[f"flax {part}"] = flax_parts[part], flax_batches
        functions[f"torch {part}"], inputs[f"torch {part}"] = torch_parts[part], torch_batches
    timings = time_alternating(
        functions, inputs, args.steps, args.blocks, args.max_other_cpu, args.retries
    )
    return {"timings": timings, "compile_seconds": compile_seconds}


def run(args, config) -> dict:
    """Build both trainers, warm them up and time them; return the measurements."""
    import torch

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    result = {"rss_start": peak_rss_bytes()}

    flax_trainer = FlaxTrainer(config, args.seed)
    torch_trainer = TorchTrainer(
        config, flax_trainer.model, flax_trainer.initial_params(), args.torch_optimizer
    )
    flax_trainable, flax_decayed = flax_trainer.counts()
    torch_trainable = sum(p.numel() for p in torch_trainer.trainable)
    if (flax_trainable, flax_decayed) != (torch_trainable, torch_trainer.decayed_count):
        raise SystemExit(
            f"error: the frameworks train different parameter sets: Flax {flax_trainable:,} "
            f"trainable ({flax_decayed:,} decayed), torch {torch_trainable:,} "
            f"({torch_trainer.decayed_count:,} decayed)"
        )
    # Repeated blocks run extra steps, which also advance the learning-rate schedule.
    per_block = args.steps // args.blocks
    torch_trainer.prepare_rates(args.warmup + args.steps + per_block * args.retries)
    host_batches = random_batches(config, args.num_batches, args.seed)
    flax_batches = [flax_trainer.place(b) for b in host_batches]
    torch_batches = [torch_trainer.to_tensors(b) for b in host_batches]

    # The first step of each starts from the same parameters on the same batch.
    result["flax_warmup"], flax_first = warm_up(flax_trainer, flax_batches, args.warmup)
    result["rss_flax"] = peak_rss_bytes()
    result["torch_warmup"], torch_first = warm_up(torch_trainer, torch_batches, args.warmup)
    result["rss_torch"] = peak_rss_bytes()
    result["first_losses"] = (flax_first, torch_first)

    result["load_before_timing"] = load_text()
    result["timings"] = time_alternating(
        {"flax": flax_trainer.train_step, "torch": torch_trainer.train_step},
        {"flax": flax_batches, "torch": torch_batches},
        args.steps,
        args.blocks,
        args.max_other_cpu,
        args.retries,
    )
    result["last_losses"] = (flax_trainer.last_loss, torch_trainer.last_loss)
    if args.breakdown:
        result["phases"] = time_phases(
            flax_trainer, torch_trainer, flax_batches, torch_batches, args
        )
    result["load_after"] = load_text()
    result["rss_end"] = peak_rss_bytes()
    result["trainable"] = flax_trainable
    result["compile_seconds"] = flax_trainer.compile_seconds
    result["costs"] = flax_trainer.costs
    result["encoder"] = flax_trainer.model.encoder
    return result


def cores_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def step_table(args, config, timings: Timings) -> str:
    import jax

    batch = config.train.batch_size
    flax_seconds, torch_seconds = timings.median("flax"), timings.median("torch")
    rows = [
        [
            "Flax (jit)",
            milliseconds(timings.times["flax"]),
            spread(timings.times["flax"]),
            f"{batch / flax_seconds:.1f}",
            f"{len(jax.devices())} XLA CPU device(s)",
            cores_text(timings.mean_other_cpu("flax")),
        ],
        [
            f"PyTorch eager, AdamW {args.torch_optimizer}",
            milliseconds(timings.times["torch"]),
            spread(timings.times["torch"]),
            f"{batch / torch_seconds:.1f}",
            f"torch.set_num_threads({args.torch_threads})",
            cores_text(timings.mean_other_cpu("torch")),
        ],
        ["ratio Flax / torch", f"**{flax_seconds / torch_seconds:.2f}**", "", "", "", ""],
    ]
    headers = [
        "framework",
        "median step (ms)",
        "min-max (ms)",
        "slices/s",
        "threads or devices",
        "other processes (cores)",
    ]
    return markdown_table(headers, rows)


def phase_table(steps: Timings, phases: Timings) -> str:
    def row(part: str, label: str) -> list[str]:
        flax_name, torch_name = f"flax {part}", f"torch {part}"
        return [
            label,
            milliseconds(phases.times[flax_name]),
            milliseconds(phases.times[torch_name]),
            f"{phases.median(flax_name) / phases.median(torch_name):.2f}",
            cores_text(phases.mean_other_cpu(flax_name)),
            cores_text(phases.mean_other_cpu(torch_name)),
        ]

    rest = [
        steps.median(name) - phases.median(f"{name} forward+backward") for name in ("flax", "torch")
    ]
    rows = [
        row("forward", "forward (loss only)"),
        row("forward+backward", "forward+backward (loss and gradients)"),
        [
            "optimizer and the rest (median step - forward+backward; negative when the "
            "separately compiled gradient program runs slower than the step)",
            f"{1000 * rest[0]:.1f}",
            f"{1000 * rest[1]:.1f}",
            "",
            "",
            "",
        ],
        row("encoder forward+backward", "encoder and fusion alone, forward+backward"),
        row("decoder forward+backward", "decoder alone, forward+backward"),
    ]
    headers = [
        "part",
        "Flax (ms)",
        "torch (ms)",
        "ratio",
        "other processes, Flax (cores)",
        "other processes, torch (cores)",
    ]
    return markdown_table(headers, rows)


def report_notes(args, result, load_line: str) -> list[str]:
    costs = result["costs"]
    timings = result["timings"]
    first, last = result["first_losses"], result["last_losses"]
    steps = {name: args.warmup + timings.calls[name] for name in ("flax", "torch")}
    if steps["flax"] == steps["torch"]:
        last_text = f"after {steps['flax']} steps: Flax {last[0]:.5f}, torch {last[1]:.5f}"
    else:
        last_text = (
            f"after {steps['flax']} Flax and {steps['torch']} torch steps (repeated blocks), "
            "not comparable"
        )
    notes = [
        load_line,
        f"load average at the start of timing {result['load_before_timing']}, at the end "
        f"{result['load_after']}",
        f"{args.steps} timed steps per framework in {args.blocks} alternating blocks, after "
        f"{args.warmup} warm-up steps; Flax warm-up {result['flax_warmup']:.1f} s, torch "
        f"warm-up {result['torch_warmup']:.1f} s, Flax train-step compile "
        f"{result['compile_seconds']:.1f} s",
        f"blocks run again because other processes kept more than {args.max_other_cpu} cores "
        f"busy: {sum(timings.repeated.values())} of train steps"
        + (
            f", {sum(result['phases']['timings'].repeated.values())} of the breakdown"
            if "phases" in result
            else ""
        ),
        f"loss at the first step: Flax {first[0]:.5f}, torch {first[1]:.5f}; {last_text}",
        f"XLA memory analysis of the train step, per device: {memory_text(costs.get('peak'))} "
        f"(arguments {memory_text(costs.get('arguments'))}, temporaries "
        f"{memory_text(costs.get('temporaries'))})",
        f"peak RSS of the process: {memory_text(result['rss_start'])} after imports, "
        f"{memory_text(result['rss_flax'])} after the Flax warm-up, "
        f"{memory_text(result['rss_torch'])} after the torch warm-up, "
        f"{memory_text(result['rss_end'])} at the end (both frameworks share the process, so "
        "the torch figure includes Flax)",
    ]
    if "phases" in result:
        notes.append(
            "breakdown: JAX compiled its forward and gradient programs in "
            f"{result['phases']['compile_seconds']:.1f} s"
        )
    return notes


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_line = wait_for_low_load(args.max_load, args.max_wait)
    config = build_config(args)

    from lasegjax.sharding import setup_host

    setup_host(config)
    import jax

    jax.config.update("jax_default_prng_impl", config.prng_impl)
    result = run(args, config)

    encoder = result["encoder"]
    height, width = config.data.image_size
    channels = 2 * config.data.context_slices + 1
    frozen = "frozen" if config.model.encoder.frozen else "trained"
    setup = (
        f"`{os.path.basename(args.config)}`: {config.model.encoder.size} encoder (depth "
        f"{encoder.depth}, width {encoder.width}, {frozen}), decoder "
        f"{tuple(config.model.decoder.channels)}, batch {config.train.batch_size} of "
        f"{height}x{width}x{channels}, {result['trainable']:,} trainable parameters in both, "
        f"loss {config.train.bce_weight} BCE + {config.train.dice_weight} Dice, AdamW with "
        "gradient clipping"
    )
    timings = result["timings"]
    sections = [("", f"Setup: {setup}."), ("", step_table(args, config, timings))]
    if "phases" in result:
        breakdown = phase_table(timings, result["phases"]["timings"])
        sections.append(
            (
                "Breakdown (medians). The encoder and decoder rows use the sum of squares of "
                "the part's output as the loss:",
                breakdown,
            )
        )
    print_report(
        "Train step: Flax against PyTorch", sections, report_notes(args, result, load_line)
    )
    result["ratio"] = timings.median("flax") / timings.median("torch")
    return result


if __name__ == "__main__":
    main()
