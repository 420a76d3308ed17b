"""The conversion table, the position-embedding resize recipes and rejection of bad input."""

import json
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from lasegjax.errors import CheckpointError
from lasegjax.model.encoder import VIT_SIZES, DinoV2Encoder
from lasegjax.model.segmenter import build_model
from tests.conftest import REPO, tiny_config
from weights_conversion import mapping
from weights_conversion.checkpoint import read_metadata, restore_params
from weights_conversion.spec import INTERPOLATIONS, EncoderSpec
from weights_conversion.to_flax import convert_to_flax, flax_shapes

TINY = EncoderSpec(
    size="tiny",
    width=96,
    depth=2,
    num_heads=3,
    mlp="gelu",
    mlp_hidden=384,
    patch_size=14,
    in_channels=3,
    num_registers=0,
    pos_grid=37,
)


def spec_for(size: str, num_registers: int, depth: int | None = None) -> EncoderSpec:
    vit = VIT_SIZES[size]
    return EncoderSpec(
        size=size,
        width=vit.width,
        depth=depth or vit.depth,
        num_heads=vit.num_heads,
        mlp=vit.mlp,
        mlp_hidden=vit.mlp_hidden,
        patch_size=14,
        in_channels=3,
        num_registers=num_registers,
        pos_grid=37,
    )


def rules_for(layout: str, spec: EncoderSpec):
    return mapping.encoder_rules(layout, spec.depth, spec.mlp, spec.num_registers)


@pytest.mark.parametrize(
    "transform,shape,count",
    [
        (mapping.IDENTITY, (1, 5, 4), 1),
        (mapping.LINEAR, (6, 4), 1),
        (mapping.CONV, (2, 3, 4, 5), 1),
        (mapping.CONCAT_LINEAR, (4, 9), 3),
        (mapping.CONCAT_BIAS, (8,), 2),
    ],
)
def test_mapping_transform_round_trip_is_exact(transform, shape, count):
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    parts = transform.to_torch(array, count)
    assert [p.shape for p in parts] == transform.source_shapes(shape, count)
    assert np.array_equal(transform.to_flax(parts), array)


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
@pytest.mark.parametrize("num_registers", [0, 4])
def test_mapping_table_covers_every_flax_parameter(size, num_registers):
    # Three blocks: every block has the same rows, and full depth only costs time.
    spec = spec_for(size, num_registers, depth=3)
    shapes = flax_shapes(spec)
    for layout in mapping.LAYOUTS:
        rules = rules_for(layout, spec)
        assert sorted(rule.target for rule in rules) == sorted(shapes), layout
        keys = [key for rule in rules for key in rule.sources]
        assert len(keys) == len(set(keys)), layout


def test_mapping_segmenter_rules_cover_every_parameter():
    config = tiny_config()
    model = build_model(config.model)
    abstract = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), np.zeros((1, 56, 56, 1), np.float32)
    )
    paths = flax.traverse_util.flatten_dict(abstract["params"], sep="/")
    rules = mapping.segmenter_rules(2, "gelu", 0, "learned", len(config.model.decoder.channels))
    assert sorted(rule.target for rule in rules) == sorted(paths)


def torch_resize(grid, recipe: str, size):
    """Resize (1, D, 37, 37) the way each source's code calls torch's interpolate."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    if recipe == "torch_hub":
        scale = ((size[0] + 0.1) / 37, (size[1] + 0.1) / 37)
        return F.interpolate(grid, scale_factor=scale, mode="bicubic")
    if recipe in ("torch_hub_registers", "huggingface_registers"):
        return F.interpolate(grid, size=size, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(grid, size=size, mode="bicubic", align_corners=False)


@pytest.mark.parametrize("recipe", list(INTERPOLATIONS))
@pytest.mark.parametrize("size", [(16, 16), (14, 27), (32, 32), (40, 52)])
def test_interpolation_recipe_matches_torch(recipe, size):
    torch = pytest.importorskip("torch")
    pos = np.random.default_rng(1).standard_normal((1, 1 + 37 * 37, 8)).astype(np.float32)
    interp = INTERPOLATIONS[recipe]
    encoder = DinoV2Encoder(
        width=8,
        depth=1,
        num_heads=1,
        mlp_hidden=8,
        interpolate_offset=interp.offset,
        interpolate_antialias=interp.antialias,
    )
    actual = encoder.apply({}, pos, *size, method=DinoV2Encoder.interpolate_pos_embed)
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    expected = torch_resize(grid, recipe, size).permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    # torch computes resize coordinates and weights in float32 and lasegjax in float64;
    # the weights differ by up to about 4e-6, the resized unit-scale values by up to 2e-5.
    assert np.abs(np.asarray(actual)[:, 1:] - expected).max() < 5e-5


def write_hub_checkpoint(path, spec=TINY, edit=None):
    """Save a random torch-hub state dict for `spec`, after `edit(state)` if given."""
    torch = pytest.importorskip("torch")
    from weights_conversion.testing import random_state_dict

    state = random_state_dict(rules_for("torch_hub", spec), flax_shapes(spec))
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return state


def test_to_flax_converts_hub_file(tmp_path):
    state = write_hub_checkpoint(tmp_path / "hub.pth")
    convert_to_flax(tmp_path / "hub.pth", tmp_path / "out")
    spec, interpolation, _ = read_metadata(tmp_path / "out")
    params = restore_params(tmp_path / "out", spec)
    assert spec == TINY
    assert interpolation == INTERPOLATIONS["torch_hub"]
    assert np.array_equal(
        params["blocks_1/attn/qkv/kernel"], state["blocks.1.attn.qkv.weight"].numpy().T
    )


def test_to_flax_rejects_unknown_key(tmp_path):
    write_hub_checkpoint(tmp_path / "hub.pth", edit=lambda s: s.update(head_weight=s["norm.bias"]))
    with pytest.raises(
        CheckpointError, match="no Flax parameter takes.*'head_weight'.*Remove heads"
    ):
        convert_to_flax(tmp_path / "hub.pth", tmp_path / "out")


def test_to_flax_rejects_missing_key(tmp_path):
    write_hub_checkpoint(tmp_path / "hub.pth", edit=lambda s: s.pop("blocks.1.ls1.gamma"))
    with pytest.raises(CheckpointError, match="is missing 1 tensor.*'blocks.1.ls1.gamma'"):
        convert_to_flax(tmp_path / "hub.pth", tmp_path / "out")


def test_to_flax_rejects_wrong_shape(tmp_path):
    torch = pytest.importorskip("torch")

    def edit(state):
        state["blocks.0.attn.proj.weight"] = torch.zeros(96, 95)

    write_hub_checkpoint(tmp_path / "hub.pth", edit=edit)
    message = r"'blocks.0.attn.proj.weight' has shape \(96, 95\).*needs \(96, 96\)"
    with pytest.raises(CheckpointError, match=message):
        convert_to_flax(tmp_path / "hub.pth", tmp_path / "out")


def test_to_flax_writes_nothing_on_error(tmp_path):
    write_hub_checkpoint(tmp_path / "hub.pth", edit=lambda s: s.pop("norm.weight"))
    with pytest.raises(CheckpointError):
        convert_to_flax(tmp_path / "hub.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_to_flax_rejects_truncated_pth(tmp_path):
    write_hub_checkpoint(tmp_path / "hub.pth")
    data = (tmp_path / "hub.pth").read_bytes()
    (tmp_path / "hub.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_to_flax(tmp_path / "hub.pth", tmp_path / "out")


def test_to_flax_rejects_truncated_safetensors(tmp_path):
    from safetensors.numpy import save_file

    state = write_hub_checkpoint(tmp_path / "hub.pth")
    save_file({k: v.numpy() for k, v in state.items()}, tmp_path / "hub.safetensors")
    data = (tmp_path / "hub.safetensors").read_bytes()
    (tmp_path / "hub.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="is truncated: tensor .* ends at byte"):
        convert_to_flax(tmp_path / "hub.safetensors", tmp_path / "out")


def test_to_flax_reads_half_precision_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    state = write_hub_checkpoint(tmp_path / "hub.pth")
    halves = {k: v.to(torch.bfloat16 if "blocks" in k else torch.float16) for k, v in state.items()}
    save_file(halves, tmp_path / "hub.safetensors")
    convert_to_flax(tmp_path / "hub.safetensors", tmp_path / "out")
    params = restore_params(tmp_path / "out", TINY)
    expected = halves["blocks.0.mlp.fc1.weight"].float().numpy().T
    assert np.array_equal(params["blocks_0/mlp/fc1/kernel"], expected)


def test_to_flax_reads_sharded_hf_folder(tmp_path):
    from safetensors.numpy import save_file

    from weights_conversion.testing import random_state_dict

    state = random_state_dict(rules_for("hf_legacy", TINY), flax_shapes(TINY))
    keys = sorted(state)
    folder = tmp_path / "hf"
    folder.mkdir()
    shards = {"model-1.safetensors": keys[::2], "model-2.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k].numpy() for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 96}))
    spec, interpolation, _ = convert_to_flax(folder, tmp_path / "out")
    assert (spec, interpolation.recipe) == (TINY, "huggingface")


def test_to_flax_rejects_contradicting_hf_config(tmp_path):
    from safetensors.numpy import save_file

    from weights_conversion.testing import random_state_dict

    folder = tmp_path / "hf"
    folder.mkdir()
    state = random_state_dict(rules_for("hf_current", TINY), flax_shapes(TINY))
    save_file({k: v.numpy() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"model_type": "dinov2", "num_hidden_layers": 12})
    )
    with pytest.raises(CheckpointError, match="num_hidden_layers=12 but the tensors imply 2"):
        convert_to_flax(folder, tmp_path / "out")


def test_to_flax_rejects_config_of_other_size(tmp_path):
    write_hub_checkpoint(tmp_path / "hub.pth")
    config = tiny_config()
    config.model.encoder.size = "small"
    config.model.encoder.num_registers = 4
    message = r"has size 'tiny' \(config: 'small'\), 0 register tokens \(config: 4\).*size=tiny"
    with pytest.raises(CheckpointError, match=message):
        convert_to_flax(tmp_path / "hub.pth", tmp_path / "out", config=config)


def test_to_flax_rejects_non_dinov2_file(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a DINOv2 backbone checkpoint"):
        convert_to_flax(tmp_path / "other.pth", tmp_path / "out")


def test_to_flax_cli_prints_error_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "weights_conversion.to_flax",
            "--src",
            str(tmp_path / "none.pth"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        1,
        f"error: --src {tmp_path / 'none.pth'} does not exist",
    )
