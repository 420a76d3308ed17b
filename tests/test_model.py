"""Tests of the encoder, fusion, decoder and full segmenter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasegjax.config import base_config
from lasegjax.model.decoder import Conv3x3, GroupNorm, UNetDecoder, resize_to, stage_sizes
from lasegjax.model.encoder import VIT_SIZES, DinoV2Encoder, default_taps
from lasegjax.model.fusion import BlockFusion
from lasegjax.model.segmenter import build_model


def encoder_for(size: str, depth: int | None = None, **kwargs) -> DinoV2Encoder:
    spec = VIT_SIZES[size]
    return DinoV2Encoder(
        width=spec.width,
        depth=depth or spec.depth,
        num_heads=spec.num_heads,
        mlp_hidden=spec.mlp_hidden,
        mlp=spec.mlp,
        **kwargs,
    )


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_params(module, shape):
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), images)["params"]


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
def test_encoder_output_shapes_every_size(size):
    encoder = encoder_for(size, depth=2, taps=(0, 1))
    outputs = jax.eval_shape(
        lambda: encoder.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 28, 42, 3)))[0]
    )
    assert len(outputs) == 2
    for out in outputs:
        assert out.shape == (2, 2, 3, VIT_SIZES[size].width)


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
def test_segmenter_logit_shape_every_size(size):
    config = base_config()
    config.model.encoder.size = size
    config.model.encoder.depth = 2
    model = build_model(config.model)
    logits = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 56, 84, 1)))[0]
    )
    assert logits.shape == (2, 56, 84, 1)


def test_encoder_small_parameter_count():
    # DINOv2 ViT-S/14 as published: 22.1 M, position embedding for 37x37 + 1 tokens and
    # the mask token included.
    params = abstract_params(encoder_for("small"), (1, 224, 224, 3))
    assert count(params) == 22_056_576


def test_encoder_base_parameter_count():
    params = abstract_params(encoder_for("base"), (1, 224, 224, 3))
    assert count(params) == 86_580_480


def test_encoder_giant_uses_swiglu_hidden_4096():
    params = abstract_params(encoder_for("giant", depth=1), (1, 28, 28, 3))
    assert params["blocks_0"]["mlp"]["w12"]["kernel"].shape == (1536, 2 * 4096)
    assert params["blocks_0"]["mlp"]["w3"]["kernel"].shape == (4096, 1536)


def test_encoder_register_tokens_shape():
    params = abstract_params(encoder_for("small", depth=1, num_registers=4), (1, 28, 28, 3))
    assert params["register_tokens"].shape == (1, 4, 384)


def test_encoder_registers_do_not_change_output_grid():
    encoder = encoder_for("tiny", num_registers=4, taps=(3,))
    outputs, _ = encoder.init_with_output(jax.random.PRNGKey(0), jnp.ones((1, 42, 56, 3)))
    assert outputs[0].shape == (1, 3, 4, 96)


def test_encoder_rejects_size_not_multiple_of_patch():
    encoder = encoder_for("tiny")
    with pytest.raises(ValueError, match="100x112 is not a multiple of the patch size 14"):
        encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 100, 112, 3)))


def test_default_taps_evenly_spaced_last_included():
    assert default_taps(12) == (2, 5, 8, 11)
    assert default_taps(40) == (9, 19, 29, 39)


def test_encoder_creates_params_for_blocks_after_last_tap():
    params = abstract_params(encoder_for("tiny", taps=(1,)), (1, 28, 28, 3))
    assert "blocks_3" in params


def test_fusion_weights_equal_at_init_and_sum_to_one():
    fusion = BlockFusion("learned")
    features = [jnp.full((1, 2, 2, 4), float(i)) for i in range(4)]
    variables = fusion.init(jax.random.PRNGKey(0), features)
    weights = jax.nn.softmax(variables["params"]["logits"])
    np.testing.assert_allclose(weights, np.full(4, 0.25))
    assert float(weights.sum()) == pytest.approx(1.0)


def test_fusion_weights_receive_gradients():
    fusion = BlockFusion("learned")
    features = [jnp.full((1, 2, 2, 4), float(i)) for i in range(4)]
    variables = fusion.init(jax.random.PRNGKey(0), features)
    grads = jax.grad(lambda v: fusion.apply(v, features).sum())(variables)
    assert np.all(np.abs(np.asarray(grads["params"]["logits"])) > 0)


def test_fusion_learned_output_is_weighted_mean_at_init():
    features = [jnp.full((1, 2, 2, 4), float(i)) for i in range(4)]
    fusion = BlockFusion("learned")
    out, _ = fusion.init_with_output(jax.random.PRNGKey(0), features)
    np.testing.assert_allclose(out, np.full((1, 2, 2, 4), 1.5), rtol=1e-6)


def test_fusion_last_block_has_no_params():
    features = [jnp.full((1, 2, 2, 4), float(i)) for i in range(3)]
    out, variables = BlockFusion("last_block").init_with_output(jax.random.PRNGKey(0), features)
    assert not variables
    np.testing.assert_array_equal(out, features[-1])


def test_fusion_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'max' is not one of"):
        BlockFusion("max").init(jax.random.PRNGKey(0), [jnp.zeros((1, 1, 1, 1))])


def test_decoder_stage_sizes_448():
    assert stage_sizes((32, 32), (448, 448), 4) == [(64, 64), (128, 128), (256, 256), (448, 448)]


@pytest.mark.parametrize("channels,groups", [(8, 8), (16, 8), (32, 8), (64, 8), (4, 4)])
def test_group_norm_matches_flax_group_norm(channels, groups):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, channels)) + 1.5
    ours = GroupNorm(num_groups=groups)
    reference = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    params = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.PRNGKey(1), x)
    )
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    params = {
        "params": {
            "scale": jax.random.normal(keys[0], (channels,)),
            "bias": jax.random.normal(keys[1], (channels,)),
        }
    }

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=2e-5)
    ours_grads = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
    reference_grads = jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv3x3_matches_conv_of_concatenation():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 10, 16))
    image = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 10, 1))
    joined = jnp.concatenate([x, image], axis=-1)
    split = Conv3x3(8)
    reference = nn.Conv(8, (3, 3), padding="SAME", use_bias=False)
    params = split.init(jax.random.PRNGKey(2), x, image)
    # Same parameter name, shape and initial values as nn.Conv on the concatenation.
    reference_params = reference.init(jax.random.PRNGKey(2), joined)
    np.testing.assert_array_equal(params["params"]["kernel"], reference_params["params"]["kernel"])
    np.testing.assert_allclose(
        split.apply(params, x, image), reference.apply(params, joined), rtol=1e-5, atol=1e-5
    )


def exact_bilinear(x: np.ndarray, size) -> np.ndarray:
    """Half-pixel bilinear upsampling in float64, edge values repeated (no antialiasing)."""

    def matrix(n, m):
        source = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n - 1)
        weights = np.zeros((m, n))
        np.add.at(weights, (np.arange(m), low), 1 - (source - low))
        np.add.at(weights, (np.arange(m), high), source - low)
        return weights

    rows, cols = matrix(x.shape[1], size[0]), matrix(x.shape[2], size[1])
    return np.einsum("oh,pw,bhwc->bopc", rows, cols, x.astype(np.float64))


# (input, output): 2x and 7/4 (the decoder's stages at 112 and 448 px), other periods,
# a 1-pixel axis, and sizes that fall back to jax.image.resize (a period longer than 16
# outputs, and shrinking).
RESIZES = [
    ((8, 8), (16, 16)),
    ((64, 64), (112, 112)),
    ((7, 9), (14, 27)),
    ((5, 5), (13, 13)),
    ((1, 3), (4, 7)),
    ((3, 4), (50, 8)),
    ((16, 16), (9, 12)),
]


@pytest.mark.parametrize("size_in,size_out", RESIZES)
def test_resize_to_matches_jax_image_resize(size_in, size_out):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *size_in, 3))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, *size_out, 3))
    reference_shape = (2, *size_out, 3)

    def ours(x):
        return jnp.sum(resize_to(x, size_out) * cotangent)

    def reference(x):
        return jnp.sum(jax.image.resize(x, reference_shape, "linear") * cotangent)

    # jax.image.resize itself is off by up to 3e-5 at 64 -> 112 (see the next test).
    np.testing.assert_allclose(
        resize_to(x, size_out), jax.image.resize(x, reference_shape, "linear"), atol=5e-5
    )
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), atol=5e-5)


@pytest.mark.parametrize("size_in,size_out", [((64, 64), (112, 112)), ((256, 32), (448, 64))])
def test_resize_to_upsampling_is_exact_bilinear(size_in, size_out):
    x = np.random.default_rng(0).normal(size=(1, *size_in, 2)).astype(np.float32)
    np.testing.assert_allclose(
        resize_to(jnp.asarray(x), size_out), exact_bilinear(x, size_out), atol=2e-6
    )


def decoder_stage_inputs(image_integration: bool, images):
    decoder = UNetDecoder(channels=(8, 8, 8), image_integration=image_integration)
    features = jnp.ones((1, 4, 4, 16))
    variables = decoder.init(jax.random.PRNGKey(0), features, images)
    _, state = decoder.apply(variables, features, images, mutable=["intermediates"])
    return state["intermediates"]


def test_decoder_image_integration_adds_image_channel():
    images = jnp.ones((1, 56, 56, 1))
    with_image = decoder_stage_inputs(True, images)
    without = decoder_stage_inputs(False, images)
    assert with_image["stage0_input"][0].shape[-1] == without["stage0_input"][0].shape[-1] + 1


def test_decoder_image_integration_feeds_image_to_every_stage():
    images = jax.random.normal(jax.random.PRNGKey(1), (1, 56, 56, 1))
    inputs = decoder_stage_inputs(True, images)
    np.testing.assert_allclose(inputs["stage2_input"][0][..., -1], images[..., 0], rtol=1e-6)


def test_decoder_output_depends_on_image_with_integration():
    decoder = UNetDecoder(channels=(8, 8), image_integration=True)
    features = jnp.ones((1, 4, 4, 16))
    image_a = jnp.zeros((1, 56, 56, 1))
    image_b = jax.random.normal(jax.random.PRNGKey(2), (1, 56, 56, 1))
    variables = decoder.init(jax.random.PRNGKey(0), features, image_a)
    out_a = decoder.apply(variables, features, image_a)
    out_b = decoder.apply(variables, features, image_b)
    assert float(jnp.abs(out_a - out_b).max()) > 0


def test_decoder_output_ignores_image_without_integration():
    decoder = UNetDecoder(channels=(8, 8), image_integration=False)
    features = jnp.ones((1, 4, 4, 16))
    image_a = jnp.zeros((1, 56, 56, 1))
    image_b = jax.random.normal(jax.random.PRNGKey(2), (1, 56, 56, 1))
    variables = decoder.init(jax.random.PRNGKey(0), features, image_a)
    np.testing.assert_array_equal(
        decoder.apply(variables, features, image_a), decoder.apply(variables, features, image_b)
    )


def test_segmenter_bfloat16_returns_float32_logits():
    config = base_config()
    config.model.encoder.size = "tiny"
    config.model.decoder.channels = (8, 8)
    model = build_model(config.model, dtype=jnp.bfloat16)
    logits, _ = model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    assert logits.dtype == jnp.float32
