"""Architecture and position-embedding resize recipe of a DINOv2 checkpoint.

A DINOv2 state dict stores neither its number of attention heads nor how its source code
resizes the 37x37 position-embedding grid, so both are derived here. The heads follow
from the width (one published size per width). The resize recipe follows from the
checkpoint's layout and register tokens.
"""

import dataclasses
import math

from lasegjax.errors import CheckpointError
from lasegjax.model.encoder import VIT_SIZES, DinoV2Encoder


@dataclasses.dataclass(frozen=True)
class Interpolation:
    """Arguments with which a source resizes its position-embedding grid.

    Attributes:
      recipe: Name of the source whose arguments these are.
      offset: With a nonzero offset, torch's `interpolate` gets
        `scale_factor=((h + offset) / G, (w + offset) / G)`; with 0 it gets `size=(h, w)`.
      antialias: The `antialias` argument of torch's `interpolate`.
    """

    recipe: str
    offset: float
    antialias: bool


# Each source's arguments to `torch.nn.functional.interpolate(mode="bicubic")`:
#   torch_hub: DINOv2 hubconf models without registers (interpolate_offset=0.1).
#   torch_hub_registers: the `_reg` hubconf models (interpolate_offset=0.0,
#     interpolate_antialias=True), which pass the target size.
#   huggingface: transformers' Dinov2Model (5.x), which passes the target size.
#   huggingface_registers: transformers' Dinov2WithRegistersModel, size and antialias.
# NOTE: transformers releases before the end of 2024 computed Dinov2Model's resize from a
# scale factor with the 0.1 offset. Features that those releases computed at sizes other
# than 518 px match `--interpolation torch_hub` instead.
INTERPOLATIONS = {
    "torch_hub": Interpolation("torch_hub", 0.1, False),
    "torch_hub_registers": Interpolation("torch_hub_registers", 0.0, True),
    "huggingface": Interpolation("huggingface", 0.0, False),
    "huggingface_registers": Interpolation("huggingface_registers", 0.0, True),
}


def default_interpolation(source_format: str, num_registers: int) -> Interpolation:
    """Return the recipe that the reference code of `source_format` uses."""
    suffix = "_registers" if num_registers else ""
    return INTERPOLATIONS[source_format + suffix]


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Architecture of a DINOv2 encoder, as stored with a converted checkpoint.

    Attributes:
      size: Key of `VIT_SIZES` with this width and MLP.
      depth: Number of blocks; can be below the size's published depth.
      mlp: "gelu" (fc1, fc2) or "swiglu" (fused w12, w3).
      pos_grid: Side of the stored position-embedding grid.
    """

    size: str
    width: int
    depth: int
    num_heads: int
    mlp: str
    mlp_hidden: int
    patch_size: int
    in_channels: int
    num_registers: int
    pos_grid: int

    def flax_module(self, interpolation: Interpolation | None = None, **kwargs) -> DinoV2Encoder:
        """Return the Flax encoder with this architecture and resize recipe."""
        interpolation = interpolation or INTERPOLATIONS["torch_hub"]
        return DinoV2Encoder(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_hidden=self.mlp_hidden,
            mlp=self.mlp,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            num_registers=self.num_registers,
            pos_grid=self.pos_grid,
            interpolate_offset=interpolation.offset,
            interpolate_antialias=interpolation.antialias,
            **kwargs,
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict) -> "EncoderSpec":
        return cls(**fields)


def size_for(width: int, mlp: str, mlp_hidden: int) -> str:
    """Return the `VIT_SIZES` key with this width and MLP, or raise CheckpointError."""
    for name, size in VIT_SIZES.items():
        if (size.width, size.mlp, size.mlp_hidden) == (width, mlp, mlp_hidden):
            return name
    known = ", ".join(
        f"{name} (width {s.width}, {s.mlp} MLP {s.mlp_hidden})" for name, s in VIT_SIZES.items()
    )
    raise CheckpointError(
        f"the checkpoint has width {width} with a {mlp} MLP of {mlp_hidden} hidden units, "
        f"which is none of the DINOv2 sizes this encoder implements: {known}. Check that "
        "the file is a DINOv2 ViT backbone"
    )


def spec_from_shapes(
    width: int,
    depth: int,
    mlp: str,
    mlp_hidden: int,
    patch_kernel_shape: tuple[int, ...],
    num_positions: int,
    num_registers: int,
) -> EncoderSpec:
    """Build the spec from tensor shapes read off a checkpoint.

    Args:
      patch_kernel_shape: torch shape (width, in_channels, patch, patch) of the patch
        embedding convolution.
      num_positions: Length of the position embedding, class token included.
    """
    size = size_for(width, mlp, mlp_hidden)
    if len(patch_kernel_shape) != 4 or patch_kernel_shape[2] != patch_kernel_shape[3]:
        raise CheckpointError(
            f"the patch embedding weight has shape {tuple(patch_kernel_shape)}, expected "
            "(width, channels, patch, patch) with a square patch"
        )
    pos_grid = math.isqrt(num_positions - 1)
    if pos_grid * pos_grid != num_positions - 1:
        raise CheckpointError(
            f"the position embedding has {num_positions} entries; expected 1 + G*G for a "
            "square G x G patch grid (1 + 37*37 = 1370 for DINOv2)"
        )
    return EncoderSpec(
        size=size,
        width=width,
        depth=depth,
        num_heads=VIT_SIZES[size].num_heads,
        mlp=mlp,
        mlp_hidden=mlp_hidden,
        patch_size=patch_kernel_shape[2],
        in_channels=patch_kernel_shape[1],
        num_registers=num_registers,
        pos_grid=pos_grid,
    )


def check_spec_against_config(spec: EncoderSpec, encoder_config, source_name: str) -> None:
    """Raise CheckpointError if `spec` cannot be loaded by the `model.encoder` config section.

    The config may ask for fewer blocks than the checkpoint contains (the encoder is then
    truncated), but not for more.
    """
    problems = []
    if encoder_config.size != spec.size:
        problems.append(f"size {spec.size!r} (config: {encoder_config.size!r})")
    if encoder_config.num_registers != spec.num_registers:
        problems.append(
            f"{spec.num_registers} register tokens (config: {encoder_config.num_registers})"
        )
    if encoder_config.patch_size != spec.patch_size:
        problems.append(f"patch size {spec.patch_size} (config: {encoder_config.patch_size})")
    if encoder_config.pos_grid != spec.pos_grid:
        problems.append(
            f"a {spec.pos_grid}x{spec.pos_grid} position grid (config: {encoder_config.pos_grid})"
        )
    depth = encoder_config.get("depth") or VIT_SIZES[encoder_config.size].depth
    if depth > spec.depth:
        problems.append(f"{spec.depth} blocks (config: {depth})")
    if problems:
        raise CheckpointError(
            f"{source_name} does not match the config: it has " + ", ".join(problems) + ". Set "
            f"--config.model.encoder.size={spec.size} "
            f"--config.model.encoder.num_registers={spec.num_registers} (and depth 0 or at "
            f"most {spec.depth}), or convert the checkpoint that the config describes"
        )
