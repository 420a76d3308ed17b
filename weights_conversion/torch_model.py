"""PyTorch versions of lasegjax's DINOv2 encoder and whole segmenter, for inference.

`DinoV2` takes a torch-hub DINOv2 state dict as it is (`blocks.N.attn.qkv`, ...) and
resizes its position embedding with the recipe recorded at conversion. `TorchSegmenter`
computes what `lasegjax.model.segmenter.Segmenter` computes, in NCHW layout: (B, C, H, W)
slices in, (B, 1, H, W) logits out. Its state-dict keys are those of
`mapping.segmenter_rules`, so `to_torch` fills it through the same table as the encoder.

Resizes in the decoder call `F.interpolate(mode="bilinear", align_corners=False,
antialias=True)`, which equals `jax.image.resize(method="linear")` (antialias on by
default) both when upsampling, where the antialias filter reduces to plain bilinear
weights, and when shrinking the image to a stage's size.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lasegjax.model.decoder import stage_sizes


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        probs = torch.softmax((q @ k.transpose(-2, -1)) * head_dim**-0.5, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU with the gate and value projections fused in `w12` (gate first)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_hidden: int, mlp: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.ls1 = LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, mlp_hidden) if mlp == "swiglu" else Mlp(width, mlp_hidden)
        self.ls2 = LayerScale(width)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)

    def forward(self, images):
        return self.proj(images)


class DinoV2(nn.Module):
    """DINOv2 ViT with torch-hub parameter names that returns patch-token maps of tapped blocks.

    Args:
      interpolate_offset, interpolate_antialias: The position-embedding resize (see
        `weights_conversion.spec.Interpolation`).
      taps: Block indices whose outputs `forward` returns; default: the last block.
      norm_taps: Apply the final LayerNorm to each returned block output.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int,
        mlp: str = "gelu",
        patch_size: int = 14,
        in_channels: int = 3,
        num_registers: int = 0,
        pos_grid: int = 37,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        taps: tuple[int, ...] = (),
        norm_taps: bool = True,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.num_registers = num_registers
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.taps = tuple(taps) or (depth - 1,)
        self.norm_taps = norm_taps
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, width))
        self.patch_embed = PatchEmbed(in_channels, width, patch_size)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_hidden, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Resize the stored position embedding to a grid_h x grid_w patch grid."""
        if (grid_h, grid_w) == (self.pos_grid, self.pos_grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = (
                (grid_h + self.interpolate_offset) / self.pos_grid,
                (grid_w + self.interpolate_offset) / self.pos_grid,
            )
            kwargs = {"scale_factor": scale}
        else:
            kwargs = {"size": (grid_h, grid_w)}
        grid = F.interpolate(
            grid.float(), mode="bicubic", antialias=self.interpolate_antialias, **kwargs
        )
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encode (B, C, H, W) images into one (B, width, H / patch, W / patch) map per tap."""
        batch, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(grid_h, grid_w)
        if self.num_registers:
            registers = self.register_tokens.expand(batch, -1, -1)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        prefix = 1 + self.num_registers
        outputs = []
        for index, block in enumerate(self.blocks[: max(self.taps) + 1]):
            x = block(x)
            if index in self.taps:
                out = self.norm(x) if self.norm_taps else x
                out = out[:, prefix:].transpose(1, 2)
                outputs.append(out.reshape(batch, -1, grid_h, grid_w))
        return outputs


class BlockFusion(nn.Module):
    """Softmax-weighted ("learned"), equal ("mean") or last-block fusion of tapped maps."""

    def __init__(self, mode: str, num_taps: int):
        super().__init__()
        self.mode = mode
        if mode == "learned":
            self.logits = nn.Parameter(torch.zeros(num_taps))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.mode == "last_block":
            return features[-1]
        stacked = torch.stack(features, dim=0)
        if self.mode == "mean":
            return stacked.mean(dim=0)
        weights = torch.softmax(self.logits, dim=0)
        return torch.einsum("n,n...->...", weights, stacked)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, features: int):
        super().__init__()
        groups = min(8, features)
        self.conv0 = nn.Conv2d(in_channels, features, 3, padding=1, bias=False)
        self.norm0 = nn.GroupNorm(groups, features, eps=1e-6)
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, features, eps=1e-6)

    def forward(self, x):
        x = F.relu(self.norm0(self.conv0(x)))
        return F.relu(self.norm1(self.conv1(x)))


class UNetDecoder(nn.Module):
    """Staged upsampling with the resized image concatenated at each stage (see the Flax one)."""

    def __init__(
        self,
        in_features: int,
        channels: tuple[int, ...],
        image_integration: bool,
        image_channels: int = 1,
    ):
        super().__init__()
        self.channels = tuple(channels)
        self.image_integration = image_integration
        self.input_proj = nn.Conv2d(in_features, channels[0], 1)
        previous = channels[0]
        for index, features in enumerate(channels):
            extra = image_channels if image_integration else 0
            self.add_module(f"stage{index}", ConvBlock(previous + extra, features))
            previous = features
        self.head = nn.Conv2d(previous, 1, 1)

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(features)
        sizes = stage_sizes(tuple(features.shape[2:]), tuple(images.shape[2:]), len(self.channels))
        for index, size in enumerate(sizes):
            x = resize_to(x, size)
            if self.image_integration:
                x = torch.cat([x, resize_to(images.float(), size)], dim=1)
            x = getattr(self, f"stage{index}")(x)
        return self.head(x)


class TorchSegmenter(nn.Module):
    """The lasegjax segmenter in PyTorch: (B, C, H, W) slices to (B, 1, H, W) logits.

    C is 1 (a grayscale slice, repeated for the encoder) or the encoder's input channel
    count: a slice between its neighbours, for models trained with
    `data.context_slices=1`. `architecture["input_channels"]` records what the model was
    trained with. The decoder receives only the middle channel.

    Args:
      architecture: The dictionary that `to_torch` writes as `segmenter.json`
        (keys `encoder`, `fusion`, `decoder`, `input_channels`).
    """

    def __init__(self, architecture: dict):
        super().__init__()
        self.architecture = architecture
        enc = dict(architecture["encoder"])
        self.in_channels = enc["in_channels"]
        self.encoder = DinoV2(**enc)
        self.fusion = BlockFusion(architecture["fusion"], len(self.encoder.taps))
        dec = architecture["decoder"]
        self.decoder = UNetDecoder(enc["width"], tuple(dec["channels"]), dec["image_integration"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        channels = images.shape[1]
        if channels == 1:
            encoder_input = images.repeat(1, self.in_channels, 1, 1)
        elif channels == self.in_channels:
            encoder_input = images
        else:
            raise ValueError(f"input has {channels} channels; expected 1 or {self.in_channels}")
        middle = channels // 2
        features = self.fusion(self.encoder(encoder_input))
        return self.decoder(features, images[:, middle : middle + 1])


def load_exported(folder: str | Path, map_location="cpu") -> TorchSegmenter:
    """Build the segmenter from `segmenter.json` and load `segmenter.pth` from an export folder."""
    folder = Path(folder)
    architecture = json.loads((folder / "segmenter.json").read_text())
    model = TorchSegmenter(architecture)
    state = torch.load(folder / "segmenter.pth", map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_exported_encoder(folder: str | Path, map_location="cpu", **kwargs) -> DinoV2:
    """Build `DinoV2` from `encoder.json` and load the torch-hub state dict of an export folder.

    Keyword arguments (`taps`, `norm_taps`) go to `DinoV2`.
    """
    folder = Path(folder)
    description = json.loads((folder / "encoder.json").read_text())
    model = DinoV2(**description["dinov2_kwargs"], **kwargs)
    state = torch.load(
        folder / "dinov2_torch_hub.pth", map_location=map_location, weights_only=True
    )
    model.load_state_dict(state, strict=True)
    return model.eval()
