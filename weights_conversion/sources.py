"""Readers for DINOv2 checkpoints: torch-hub `.pth` files and Hugging Face folders.

Every reader lists keys, shapes and dtypes before any tensor data is converted. It then
hands out each tensor once, as a float32 NumPy array, and drops its own reference, so
converting a checkpoint keeps about one copy of the weights in memory rather than two.

safetensors files are read with plain file reads at the offsets in their header instead
of a memory map, because pages of a mapped file stay in the process's resident set until
it is unmapped.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lasegjax.errors import CheckpointError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # read as raw bits, widened to float32 below
}


@dataclasses.dataclass
class TensorFile:
    """Keys, shapes and dtypes of one weight file, and a function that reads one tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    read: Callable[[str], np.ndarray]


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def open_safetensors(path: Path) -> TensorFile:
    """Parse the header of a safetensors file and check that all tensor data is present."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is {size} bytes long, too short for a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: the safetensors header claims {header_len} bytes but the file has "
                f"{size}; the file is truncated or not safetensors. Download or copy it again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{path}: the safetensors header is not valid JSON ({err})"
            ) from err
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    shapes, dtypes, entries = {}, {}, {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {info['dtype']}; only floating-point "
                f"weights ({', '.join(_SAFETENSORS_DTYPES)}) can be converted"
            )
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r} of shape {shape} and dtype {info['dtype']} spans "
                f"{end - begin} bytes; the header is corrupt"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {key!r} ends at byte {data_start + end} but "
                f"the file has {size} bytes. Download or copy the file again"
            )
        shapes[key], dtypes[key] = shape, info["dtype"]
        entries[key] = (data_start + begin, dtype, shape)

    def read(key: str) -> np.ndarray:
        offset, dtype, shape = entries.pop(key)
        array = np.empty(shape, dtype)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(array).cast("B")) != array.nbytes:
                raise CheckpointError(f"{path}: could not read all bytes of tensor {key!r}")
        if dtypes[key] == "BF16":
            return _bf16_to_f32(array)
        return array.astype(np.float32, copy=False)

    return TensorFile(path, shapes, dtypes, read)


def open_torch(path: Path) -> TensorFile:
    """Load a `torch.save`d state dict (`.pth`, `.bin`) with torch's safe loader."""
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"reading {path} needs PyTorch: pip install torch, or convert a .safetensors file"
        ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({err}). The file is truncated "
            "or corrupt; download or copy it again"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} does not contain a flat state dict of tensors (found {type(state).__name__}"
            f"{' with non-tensor values' if isinstance(state, dict) else ''}); save "
            "`model.state_dict()` of the backbone and convert that file"
        )
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {tensor.dtype}; only floating-point "
                "weights can be converted"
            )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}

    def read(key: str) -> np.ndarray:
        tensor = state.pop(key)
        return tensor.detach().to(torch.float32).numpy()

    return TensorFile(path, shapes, dtypes, read)


def open_weight_file(path: Path) -> TensorFile:
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    return open_torch(path)


@dataclasses.dataclass
class SourceCheckpoint:
    """A DINOv2 checkpoint: its tensors (possibly in shards) and the Hugging Face config.

    Attributes:
      layout: "torch_hub", "hf_legacy" or "hf_current" (see `mapping`).
      format: "torch_hub" or "huggingface", the family whose code produced the layout.
      hf_config: The folder's `config.json`, or None for a single file.
    """

    path: Path
    files: list[TensorFile]
    layout: str
    hf_config: dict | None

    @property
    def format(self) -> str:
        return "torch_hub" if self.layout == "torch_hub" else "huggingface"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for f in self.files for k, s in f.shapes.items()}

    @property
    def dtypes(self) -> dict[str, str]:
        return {k: d for f in self.files for k, d in f.dtypes.items()}

    def read(self, key: str) -> np.ndarray:
        for f in self.files:
            if key in f.shapes:
                return f.read(key)
        raise KeyError(key)


def detect_layout(keys, path) -> str:
    """Return the key layout of a DINOv2 state dict, or raise CheckpointError."""
    keys = set(keys)
    if "embeddings.cls_token" in keys:
        if any(".attention.q_proj." in k for k in keys):
            return "hf_current"
        return "hf_legacy"
    if "cls_token" in keys:
        return "torch_hub"
    wrapped = sorted(k for k in keys if k.startswith(("dinov2.", "backbone.", "module.", "model.")))
    if wrapped:
        prefix = wrapped[0].split(".")[0] + "."
        raise CheckpointError(
            f"{path}: keys start with {prefix!r}. Save the backbone's own state dict (without "
            "the wrapper's prefix) and convert that file"
        )
    raise CheckpointError(
        f"{path} is not a DINOv2 backbone checkpoint: it has neither 'cls_token' (torch hub) "
        f"nor 'embeddings.cls_token' (Hugging Face). First keys: {sorted(keys)[:5]}"
    )


def _hf_files(folder: Path) -> list[Path]:
    for index_name in HF_INDEX_FILES:
        index = folder / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in HF_WEIGHT_FILES:
        if (folder / name).exists():
            return [folder / name]
    raise CheckpointError(
        f"{folder} has none of {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)}; pass a Hugging "
        "Face model folder or a single weight file"
    )


def open_source(path: str | os.PathLike) -> SourceCheckpoint:
    """Open a torch-hub file, a single weight file, or a Hugging Face model folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--src {path} does not exist")
    hf_config = None
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise CheckpointError(
                f"{path} is a folder without config.json; pass a Hugging Face model folder or a weight file"
            )
        hf_config = json.loads(config_path.read_text())
        files = [open_weight_file(p) for p in _hf_files(path)]
    else:
        files = [open_weight_file(path)]
    keys = [k for f in files for k in f.shapes]
    return SourceCheckpoint(path, files, detect_layout(keys, path), hf_config)
