"""Training from converted weights, and export of the whole segmenter to PyTorch."""

import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lasegjax import checkpointing  # noqa: E402
from lasegjax.errors import CheckpointError, ConfigError  # noqa: E402
from lasegjax.model.decoder import resize_to as jax_resize_to  # noqa: E402
from lasegjax.model.segmenter import build_model  # noqa: E402
from lasegjax.optim import build_optimizer  # noqa: E402
from lasegjax.train import TrainState, load_encoder_checkpoint, save_resolved_config  # noqa: E402
from tests.conftest import REPO, tiny_config  # noqa: E402
from weights_conversion import mapping, testing  # noqa: E402
from weights_conversion.checkpoint import apply_checkpoint_recipe, restore_params  # noqa: E402
from weights_conversion.spec import EncoderSpec  # noqa: E402
from weights_conversion.to_flax import convert_to_flax, flax_shapes  # noqa: E402
from weights_conversion.to_torch import export  # noqa: E402
from weights_conversion.torch_model import load_exported, resize_to  # noqa: E402

TOLERANCE = 1e-4


def tiny_spec(num_registers: int = 0, depth: int = 2) -> EncoderSpec:
    return EncoderSpec(
        size="tiny",
        width=96,
        depth=depth,
        num_heads=3,
        mlp="gelu",
        mlp_hidden=384,
        patch_size=14,
        in_channels=3,
        num_registers=num_registers,
        pos_grid=37,
    )


@pytest.mark.parametrize(
    "shape,size",
    [
        ((4, 8, 10, 3), (16, 20)),
        ((1, 14, 27, 2), (28, 54)),
        ((2, 56, 84, 1), (16, 24)),
        ((1, 56, 42, 1), (28, 84)),
    ],
)
def test_torch_resize_matches_jax_image_resize(shape, size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = np.asarray(jax_resize_to(jnp.asarray(x), size))
    actual = resize_to(torch.from_numpy(x).permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).numpy()
    assert np.abs(actual - expected).max() < 1e-5


def abstract_params(model, config):
    # eval_shape instead of init: initialising even the tiny model compiles for tens of
    # seconds on a loaded 2-core CPU, and every value is replaced anyway.
    sample = jax.ShapeDtypeStruct((1, *config.data.image_size, 1), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)["params"]


def randomized_params(model, config, seed: int):
    """Return parameters of `model` with random values of unit scale."""
    flat = flax.traverse_util.flatten_dict(abstract_params(model, config), sep="/")
    rng = np.random.default_rng(seed)
    for key, value in flat.items():
        if key.endswith(("gamma", "scale")):
            flat[key] = 0.5 + rng.random(value.shape, np.float32)
        elif key.endswith("kernel"):
            fan_in = int(np.prod(value.shape[:-1]))
            flat[key] = rng.standard_normal(value.shape, np.float32) / np.sqrt(fan_in)
        else:
            flat[key] = rng.standard_normal(value.shape, np.float32)
    return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def write_workdir(workdir, config, params, step: int = 7):
    """Lay out `workdir` as training does: config.json and an orbax manager with the train state."""
    workdir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, workdir)
    tx, _ = build_optimizer(config, params)
    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    manager = checkpointing.make_manager(workdir / "checkpoints", keep=2)
    checkpointing.save(manager, step, state, force=True)
    manager.close()


SEGMENTERS = {
    "tiny_learned": dict(
        size="tiny", depth=2, num_registers=0, fusion="learned", offset=0.1, antialias=False
    ),
    "small_registers_mean": dict(
        size="small", depth=1, num_registers=4, fusion="mean", offset=0.0, antialias=True
    ),
}


@pytest.fixture(scope="module", params=list(SEGMENTERS))
def exported_segmenter(request, tmp_path_factory):
    options = SEGMENTERS[request.param]
    config = tiny_config()
    config.model.encoder.size = options["size"]
    config.model.encoder.depth = options["depth"]
    config.model.encoder.num_taps = options["depth"]
    config.model.encoder.num_registers = options["num_registers"]
    config.model.encoder.interpolate_offset = options["offset"]
    config.model.encoder.interpolate_antialias = options["antialias"]
    config.model.fusion = options["fusion"]
    model = build_model(config.model)
    params = randomized_params(model, config, seed=3)
    workdir = tmp_path_factory.mktemp(request.param) / "run"
    write_workdir(workdir, config, params)
    out = workdir.parent / "export"
    export(workdir, out)
    return model, params, out, workdir


@pytest.mark.parametrize("height,width", [(56, 56), (42, 70)])
def test_exported_segmenter_matches_flax_logits(exported_segmenter, height, width):
    model, params, out, _ = exported_segmenter
    images = np.random.default_rng(height).random((2, height, width, 1), np.float32)
    expected = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))
    with torch.no_grad():
        actual = load_exported(out)(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert np.abs(actual.permute(0, 2, 3, 1).numpy() - expected).max() < TOLERANCE


def test_exported_segmenter_matches_flax_with_neighbour_slices(exported_segmenter):
    # A slice between its two neighbours, as models trained with data.context_slices=1 see.
    model, params, out, _ = exported_segmenter
    images = np.random.default_rng(1).random((1, 56, 56, 3), np.float32)
    expected = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))
    with torch.no_grad():
        actual = load_exported(out)(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert np.abs(actual.permute(0, 2, 3, 1).numpy() - expected).max() < TOLERANCE


def test_exported_segmenter_records_step(exported_segmenter):
    _, _, out, _ = exported_segmenter
    assert load_exported(out).architecture["step"] == 7


def test_export_rejects_missing_step(exported_segmenter, tmp_path):
    *_, workdir = exported_segmenter
    with pytest.raises(CheckpointError, match=r"has no step 99; available steps: \[7\]"):
        export(workdir, tmp_path, step=99)


def test_export_rejects_unknown_folder(tmp_path):
    with pytest.raises(
        CheckpointError, match="neither a training workdir .* nor a converted encoder"
    ):
        export(tmp_path, tmp_path / "out")


@pytest.fixture
def converted_tiny(tmp_path):
    """A converted torch-hub checkpoint of a 2-block tiny encoder with 4 register tokens."""
    spec = tiny_spec(num_registers=4)
    rules = mapping.encoder_rules("torch_hub", spec.depth, spec.mlp, spec.num_registers)
    torch.save(testing.random_state_dict(rules, flax_shapes(spec)), tmp_path / "hub.pth")
    convert_to_flax(tmp_path / "hub.pth", tmp_path / "converted")
    return tmp_path / "converted", spec


def checkpoint_config(path, num_registers=4, depth=2):
    config = tiny_config()
    config.model.encoder.checkpoint = str(path)
    config.model.encoder.num_registers = num_registers
    config.model.encoder.depth = depth
    config.model.encoder.num_taps = depth
    return config


def init_params(config):
    abstract = abstract_params(build_model(config.model), config)
    return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)


def test_apply_checkpoint_recipe_sets_interpolation(converted_tiny):
    path, _ = converted_tiny
    config = checkpoint_config(path)
    apply_checkpoint_recipe(config)
    encoder = config.model.encoder
    assert (encoder.interpolate_offset, encoder.interpolate_antialias) == (0.0, True)


def test_load_encoder_checkpoint_replaces_encoder(converted_tiny):
    path, spec = converted_tiny
    config = checkpoint_config(path)
    apply_checkpoint_recipe(config)
    params = init_params(config)
    loaded = flax.traverse_util.flatten_dict(
        load_encoder_checkpoint(config, params)["encoder"], sep="/"
    )
    expected = restore_params(path, spec)
    assert [k for k in expected if not np.array_equal(loaded[k], expected[k])] == []


def test_load_encoder_checkpoint_keeps_decoder(converted_tiny):
    path, _ = converted_tiny
    config = checkpoint_config(path)
    apply_checkpoint_recipe(config)
    params = init_params(config)
    loaded = load_encoder_checkpoint(config, params)
    assert loaded["decoder"] is params["decoder"]


def test_load_encoder_checkpoint_truncates_to_config_depth(converted_tiny):
    path, spec = converted_tiny
    config = checkpoint_config(path, depth=1)
    apply_checkpoint_recipe(config)
    loaded = load_encoder_checkpoint(config, init_params(config))["encoder"]
    expected = restore_params(path, spec)["blocks_0/ls1/gamma"]
    assert (
        "blocks_1" not in loaded,
        np.array_equal(loaded["blocks_0"]["ls1"]["gamma"], expected),
    ) == (True, True)


def test_load_encoder_checkpoint_rejects_other_registers(converted_tiny):
    path, _ = converted_tiny
    config = checkpoint_config(path, num_registers=0)
    with pytest.raises(CheckpointError, match=r"4 register tokens \(config: 0\)"):
        load_encoder_checkpoint(config, init_params(config))


def test_load_encoder_checkpoint_rejects_other_recipe(converted_tiny):
    path, _ = converted_tiny
    config = checkpoint_config(path)  # keeps the default torch-hub offset 0.1
    with pytest.raises(ConfigError, match="torch_hub_registers source .*apply_checkpoint_recipe"):
        load_encoder_checkpoint(config, init_params(config))


def test_load_encoder_checkpoint_rejects_missing_folder(tmp_path):
    config = checkpoint_config(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="does not exist; create it with"):
        load_encoder_checkpoint(config, {})


@pytest.mark.slow
def test_conversion_snippet_runs(tmp_path):
    # The README snippet, run as written with a random tiny torch-hub checkpoint, the demo
    # config and overrides that shrink training to two steps on small phantom volumes.
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Pretrained DINOv2 weights") :]
    script = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    torch.save(testing.hub_model("tiny", 4, seed=2).state_dict(), tmp_path / "tiny.pth")
    overrides = [
        "--config.model.encoder.depth=2",
        "--config.model.encoder.num_taps=2",
        "--config.data.image_size=(56,56)",
        "--config.data.phantom.num_cases=3",
        "--config.data.phantom.shape=(48,48,8)",
        "--config.data.num_val=1",
        "--config.model.decoder.channels=(16,8,8)",
        "--config.train.batch_size=4",
        "--config.train.num_steps=2",
        "--config.train.warmup_steps=1",
        "--config.eval.batch_size=8",
    ]
    env = dict(
        os.environ,
        SRC=str(tmp_path / "tiny.pth"),
        CONFIG=str(REPO / "configs" / "demo.py"),
        TRAIN_FLAGS=" ".join(overrides),
        PYTHONPATH=str(REPO),
        PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    )
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(2, 1, 448, 448)"
