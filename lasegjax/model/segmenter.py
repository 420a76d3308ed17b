"""The full model: DINOv2 encoder, block fusion and image-fed UNet decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lasegjax.model.decoder import UNetDecoder
from lasegjax.model.encoder import VIT_SIZES, DinoV2Encoder, default_taps
from lasegjax.model.fusion import BlockFusion


class Segmenter(nn.Module):
    """Segment 2D slices into one-channel LA logits."""

    encoder: DinoV2Encoder
    fusion: BlockFusion
    decoder: UNetDecoder

    def __call__(self, images: jax.Array) -> jax.Array:
        """Return (B, H, W, 1) logits for (B, H, W, C) slices.

        C is 1 (a grayscale slice, repeated for the encoder) or the encoder's input
        channel count (a slice with its neighbours, the slice itself in the middle). The
        decoder receives only the middle channel.
        """
        channels = images.shape[-1]
        if channels == 1:
            encoder_input = jnp.repeat(images, self.encoder.in_channels, axis=-1)
        elif channels == self.encoder.in_channels:
            encoder_input = images
        else:
            raise ValueError(
                f"input has {channels} channels; expected 1 or {self.encoder.in_channels} "
                "(set data.context_slices to 0 or 1)"
            )
        features = self.encoder(encoder_input)
        fused = self.fusion(features)
        middle = channels // 2
        return self.decoder(fused, images[..., middle : middle + 1])


def build_model(model_config: ml_collections.ConfigDict, dtype=jnp.float32) -> Segmenter:
    """Build a `Segmenter` from the `model` section of a config."""
    enc = model_config.encoder
    size = VIT_SIZES[enc.size]
    depth = enc.get("depth") or size.depth
    taps = tuple(enc.taps) if enc.get("taps") else default_taps(depth, enc.num_taps)
    encoder = DinoV2Encoder(
        width=size.width,
        depth=depth,
        num_heads=size.num_heads,
        mlp_hidden=size.mlp_hidden,
        mlp=size.mlp,
        patch_size=enc.patch_size,
        num_registers=enc.num_registers,
        pos_grid=enc.pos_grid,
        taps=taps,
        norm_taps=enc.norm_taps,
        interpolate_offset=enc.interpolate_offset,
        interpolate_antialias=enc.interpolate_antialias,
        scan_blocks=enc.get("scan", False),
        remat_policy=enc.get("remat", "none"),
        dtype=dtype,
        name="encoder",
    )
    fusion = BlockFusion(mode=model_config.fusion, name="fusion")
    decoder = UNetDecoder(
        channels=tuple(model_config.decoder.channels),
        image_integration=model_config.decoder.image_integration,
        dtype=dtype,
        name="decoder",
    )
    return Segmenter(encoder=encoder, fusion=fusion, decoder=decoder)
