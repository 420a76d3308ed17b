"""Parity of converted DINOv2 encoders with random-initialised PyTorch reference models.

Each case builds a reference offline (official DINOv2 code for the torch-hub layout,
transformers for the Hugging Face layouts), saves it as users hold it, converts it with
`to_flax`, and compares the final features and every tapped block's output at 224x224
and 196x378 within 1e-4, then exports back with `to_torch` and checks that every tensor
returns bit-identical. L and g run at full width with reduced depth.
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
    depth: int
    naming: str = "legacy"  # Hugging Face key naming of the saved folder
    num_registers: int = 0


CASES = {
    "hub_small_full_depth": Case("hub", "small", 12),
    "hub_base": Case("hub", "base", 3),
    "hub_large": Case("hub", "large", 2),
    "hub_giant": Case("hub", "giant", 2),
    "hf_small_legacy": Case("hf", "small", 2),
    "hf_base_current": Case("hf", "base", 2, naming="current"),
    "hf_giant_legacy": Case("hf", "giant", 2),
    "hf_giant_current": Case("hf", "giant", 2, naming="current"),
    "hf_registers_large_legacy": Case("hf", "large", 2, num_registers=4),
    "hf_registers_giant_current": Case("hf", "giant", 2, naming="current", num_registers=4),
}


def save_reference(case: Case, model, folder):
    """Save `model` the way users hold such weights; return the path for --src."""
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
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
    expected_taps, expected_final = reference_features(case, model, images, taps)
    encoder = spec.flax_module(interpolation, taps=taps)
    outputs = jax.jit(encoder.apply)({"params": params}, images.permute(0, 2, 3, 1).numpy())
    grid = (height // 14, width // 14)
    for tap, expected, actual in zip(taps, expected_taps, outputs, strict=True):
        expected = expected.numpy().reshape(2, *grid, -1)
        error = np.abs(np.asarray(actual) - expected).max()
        assert error < TOLERANCE, f"block {tap}: max abs difference {error}"
    final = expected_final.numpy().reshape(2, *grid, -1)
    assert np.abs(np.asarray(outputs[-1]) - final).max() < TOLERANCE


def test_conversion_records_source_recipe(converted):
    case, _, _, _, _, interpolation, _, metadata = converted
    family = "torch_hub" if case.source == "hub" else "huggingface"
    expected = family + ("_registers" if case.num_registers else "")
    assert (interpolation.recipe, metadata["source"]["format"]) == (expected, family)


def test_conversion_infers_size_and_registers(converted):
    case, _, _, _, spec, _, _, _ = converted
    assert (spec.size, spec.depth, spec.num_registers) == (case.size, case.depth, case.num_registers)


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
    _, info = transformers.AutoModel.from_pretrained(exported / "dinov2_hf", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert problems == {}


def test_conversion_hf_export_matches_reference_at_native_grid(converted, exported):
    # At 518 px no source resizes the position embedding, so every layout must agree.
    case, model, *_ = converted
    exported_model = transformers.AutoModel.from_pretrained(exported / "dinov2_hf").eval()
    images = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(5))
    _, expected = reference_features(case, model, images, [])
    _, actual = testing.hf_features(exported_model, images, [])
    assert (actual - expected).abs().max().item() < TOLERANCE
