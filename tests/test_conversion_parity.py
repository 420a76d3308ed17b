"""Parity of converted DINOv2 encoders with random-initialised PyTorch reference models.

Each case builds a reference offline: the official DINOv2 code for the torch-hub layout,
transformers for the Hugging Face layouts. The test saves it as users keep such weights,
converts it with `to_flax`, and compares the final features and every tapped block's
output at 224x224 and 196x378 within 1e-4. It then exports back with `to_torch` and
checks that every tensor returns bit-identical. All sizes run at full width with two
blocks.
"""

import dataclasses

import flax
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lasegjax.model.encoder import default_taps  # noqa: E402
from weights_conversion import testing  # noqa: E402
from weights_conversion.checkpoint import read_metadata, restore_params  # noqa: E402
from weights_conversion.to_flax import convert_to_flax  # noqa: E402
from weights_conversion.to_torch import export  # noqa: E402

TOLERANCE = 1e-4
SIZES = [(224, 224), (196, 378)]


@dataclasses.dataclass(frozen=True)
class Case:
    source: str  # "hub" (official DINOv2 code) or "hf" (transformers)
    size: str
    depth: int = 2
    naming: str = "legacy"  # Hugging Face key naming of the saved folder
    num_registers: int = 0


CASES = {
    "hub_small": Case("hub", "small"),
    "hub_base": Case("hub", "base"),
    "hub_large": Case("hub", "large"),
    "hub_giant": Case("hub", "giant"),
    "hf_base_current": Case("hf", "base", naming="current"),
    "hf_giant_current": Case("hf", "giant", naming="current"),
    "hf_registers_large_legacy": Case("hf", "large", num_registers=4),
    "hf_registers_small_current": Case("hf", "small", naming="current", num_registers=4),
}


def save_reference(case: Case, model, folder):
    """Save `model` the way users keep such weights; return the path for --src."""
    if case.source == "hub":
        path = folder / f"dinov2_{case.size}_pretrain.pth"
        torch.save(model.state_dict(), path)
        return path
    path = folder / "hf"
    if case.naming == "legacy":
        # transformers 5.x writes the published (legacy) key names.
        model.save_pretrained(path)
    else:
        # The in-memory names of transformers 5.x, as a plain `torch.save` writes them.
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    if case.source == "hub":
        pytest.importorskip("dinov2.models.vision_transformer")
        model = testing.hub_model(case.size, case.depth, seed=len(request.param))
    else:
        model = testing.hf_model(case.size, case.depth, case.num_registers, seed=len(request.param))
    src = save_reference(case, model, folder)
    out = folder / "flax"
    convert_to_flax(src, out)
    spec, interpolation, metadata = read_metadata(out)
    params = flax.traverse_util.unflatten_dict(restore_params(out, spec), sep="/")
    return case, model, src, out, spec, interpolation, params, metadata


def reference_features(case, model, images, taps):
    if case.source == "hub":
        return testing.hub_features(model, images, taps)
    return testing.hf_features(model, images, taps)


@pytest.mark.parametrize("height,width", SIZES)
def test_conversion_features_match_reference(converted, height, width):
    case, model, _, _, spec, interpolation, params, _ = converted
    taps = default_taps(spec.depth) if spec.depth > 4 else tuple(range(spec.depth))
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
    expected_taps, expected_final = reference_features(case, model, images, taps)
    encoder = spec.flax_module(interpolation, taps=taps)
    outputs = jax.jit(encoder.apply)({"params": params}, images.permute(0, 2, 3, 1).numpy())
    grid = (height // 14, width // 14)
    for tap, expected, actual in zip(taps, expected_taps, outputs, strict=True):
        expected = expected.numpy().reshape(1, *grid, -1)
        error = np.abs(np.asarray(actual) - expected).max()
        assert error < TOLERANCE, f"block {tap}: max abs difference {error}"
    final = expected_final.numpy().reshape(1, *grid, -1)
    assert np.abs(np.asarray(outputs[-1]) - final).max() < TOLERANCE


def test_conversion_records_source_recipe(converted):
    case, _, _, _, _, interpolation, _, metadata = converted
    family = "torch_hub" if case.source == "hub" else "huggingface"
    expected = family + ("_registers" if case.num_registers else "")
    assert (interpolation.recipe, metadata["source"]["format"]) == (expected, family)


def test_conversion_infers_size_and_registers(converted):
    case, _, _, _, spec, _, _, _ = converted
    assert (spec.size, spec.depth, spec.num_registers) == (
        case.size,
        case.depth,
        case.num_registers,
    )


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    case, *_ = converted
    folder = tmp_path_factory.mktemp("export")
    export(converted[3], folder, hf_naming=case.naming)
    return folder


def test_conversion_round_trip_is_bit_identical(converted, exported):
    case, model, src, *_ = converted
    if case.source == "hub":
        expected = torch.load(src, weights_only=True)
        actual = torch.load(exported / "dinov2_torch_hub.pth", weights_only=True)
    else:
        from safetensors.torch import load_file

        if case.naming == "legacy":
            expected = load_file(src / "model.safetensors")
        else:
            expected = torch.load(src / "pytorch_model.bin", weights_only=True)
        actual = load_file(exported / "dinov2_hf" / "model.safetensors")
    assert sorted(actual) == sorted(expected)
    unequal = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert unequal == []


def test_conversion_export_loads_in_transformers(converted, exported):
    *_, spec, _, _, _ = converted
    _, info = transformers.AutoModel.from_pretrained(
        exported / "dinov2_hf", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert problems == {}


@pytest.mark.parametrize("size", ["small", "giant"])
def test_conversion_hub_to_hf_matches_at_native_grid(size, tmp_path):
    # At the stored grid no source resizes the position embedding, so torch-hub and
    # Hugging Face models with the same tensors must agree. A 16x16 grid (224 px) keeps
    # this cheap.
    model = testing.hub_model(size, 2, seed=11, img_size=224)
    torch.save(model.state_dict(), tmp_path / "hub.pth")
    convert_to_flax(tmp_path / "hub.pth", tmp_path / "flax")
    export(tmp_path / "flax", tmp_path / "export")
    exported_model = transformers.AutoModel.from_pretrained(
        tmp_path / "export" / "dinov2_hf"
    ).eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    _, expected = testing.hub_features(model, images, [])
    _, actual = testing.hf_features(exported_model, images, [])
    assert (actual - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("converted", ["hf_giant_current"], indirect=True)
def test_conversion_legacy_swiglu_export_loads_exactly(converted, tmp_path):
    # transformers splits the published `mlp.weights_in` into gate and up projections when
    # it loads; its result must equal the model the weights came from.
    _, model, _, out, *_ = converted
    export(out, tmp_path, hf_naming="legacy")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "dinov2_hf")
    expected, actual = model.state_dict(), loaded.state_dict()
    assert sorted(actual) == sorted(expected)
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []


def hf_registers_to_hub(state: dict) -> dict:
    """Rename a Dinov2WithRegistersModel state dict (transformers 5.x names) to torch-hub keys.

    Written out here, apart from `weights_conversion.mapping`, so that the test does not
    check the table against itself.
    """
    hub = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "mask_token": state["embeddings.mask_token"],
        "register_tokens": state["embeddings.register_tokens"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    for i in range(depth):
        hf, new = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            hub[new + f"attn.qkv.{kind}"] = torch.cat(
                [state[hf + f"attention.{n}_proj.{kind}"] for n in "qkv"], dim=0
            )
            hub[new + f"attn.proj.{kind}"] = state[hf + f"attention.o_proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hub[new + f"{name}.{kind}"] = state[hf + f"{name}.{kind}"]
        hub[new + "ls1.gamma"] = state[hf + "layer_scale1.lambda1"]
        hub[new + "ls2.gamma"] = state[hf + "layer_scale2.lambda1"]
    return hub


@pytest.fixture(scope="module")
def hub_registers(tmp_path_factory):
    """A torch-hub `_reg4` file made from a random Hugging Face registers model."""
    folder = tmp_path_factory.mktemp("hub_registers")
    model = testing.hf_model("small", 2, num_registers=4, seed=7)
    torch.save(hf_registers_to_hub(model.state_dict()), folder / "dinov2_vits14_reg4_pretrain.pth")
    spec, interpolation, out = convert_to_flax(
        folder / "dinov2_vits14_reg4_pretrain.pth", folder / "flax"
    )
    params = flax.traverse_util.unflatten_dict(restore_params(out, spec), sep="/")
    return model, spec, interpolation, params


def test_conversion_hub_registers_records_recipe(hub_registers):
    _, spec, interpolation, _ = hub_registers
    assert (spec.num_registers, interpolation.recipe) == (4, "torch_hub_registers")


def test_conversion_hub_registers_match_at_native_grid(hub_registers):
    # No reference implementation of the torch-hub registers models is installable, so the
    # features are compared at 518 px, where no position-embedding resize happens. The
    # resize itself is tested against torch's interpolate in test_conversion_mapping.
    model, spec, interpolation, params = hub_registers
    images = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(3))
    expected_taps, expected_final = testing.hf_features(model, images, [0, 1])
    encoder = spec.flax_module(interpolation, taps=(0, 1))
    outputs = jax.jit(encoder.apply)({"params": params}, images.permute(0, 2, 3, 1).numpy())
    for expected, actual in zip(
        [*expected_taps, expected_final], [*outputs, outputs[-1]], strict=True
    ):
        error = np.abs(np.asarray(actual) - expected.numpy().reshape(1, 37, 37, -1)).max()
        assert error < TOLERANCE


@pytest.mark.parametrize("converted", ["hub_giant", "hf_registers_small_current"], indirect=True)
def test_conversion_torch_encoder_matches_reference(converted, exported):
    # torch_model.DinoV2 resizes with the recorded recipe, so it matches the source model
    # away from 518 px too.
    from weights_conversion.torch_model import load_exported_encoder

    case, model, *_ = converted
    encoder = load_exported_encoder(exported, taps=(0, 1))
    images = torch.randn(1, 3, 196, 378, generator=torch.Generator().manual_seed(9))
    expected_taps, _ = reference_features(case, model, images, [0, 1])
    with torch.no_grad():
        actual_taps = encoder(images)
    for expected, actual in zip(expected_taps, actual_taps, strict=True):
        actual = actual.flatten(2).transpose(1, 2)
        assert (actual - expected).abs().max().item() < TOLERANCE
