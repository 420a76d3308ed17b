"""Peak resident memory of converting a full-size DINOv2 g/14 checkpoint to Flax.

  python bench/convert_memory.py --workdir /tmp/convert_memory

Writes a random g/14 checkpoint (40 blocks, 1.1 B parameters, about 4.5 GB in float32)
in the torch-hub layout. Then it runs `python -m weights_conversion.to_flax` on the file
in a child process and reports the child's peak resident set size (`ru_maxrss`) against
the file size. The random tensors are freed before the child starts, so the child's figure
is the converter's alone. Needs about 9 GB of memory and twice the file size on disk.
"""

import argparse
import gc
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_random_checkpoint(path: Path, num_registers: int, file_format: str) -> int:
    """Write a random torch-hub g/14 state dict to `path`; return the parameter count."""
    import torch

    from lasegjax.model.encoder import VIT_SIZES
    from weights_conversion import mapping
    from weights_conversion.spec import EncoderSpec
    from weights_conversion.testing import random_state_dict
    from weights_conversion.to_flax import flax_shapes

    vit = VIT_SIZES["giant"]
    spec = EncoderSpec(
        size="giant",
        width=vit.width,
        depth=vit.depth,
        num_heads=vit.num_heads,
        mlp=vit.mlp,
        mlp_hidden=vit.mlp_hidden,
        patch_size=14,
        in_channels=3,
        num_registers=num_registers,
        pos_grid=37,
    )
    rules = mapping.encoder_rules("torch_hub", spec.depth, spec.mlp, spec.num_registers)
    state = random_state_dict(rules, flax_shapes(spec))
    count = sum(t.numel() for t in state.values())
    if file_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    del state
    gc.collect()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, required=True, help="Scratch folder; emptied first."
    )
    parser.add_argument("--registers", type=int, default=0, help="Register tokens (0 or 4).")
    parser.add_argument("--format", choices=["pth", "safetensors"], default="pth")
    parser.add_argument("--keep", action="store_true", help="Keep the files after the run.")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    suffix = "_reg4" if args.registers else ""
    src = args.workdir / f"dinov2_vitg14{suffix}_pretrain.{args.format}"
    start = time.perf_counter()
    count = write_random_checkpoint(src, args.registers, args.format)
    print(f"wrote {src} ({count / 1e9:.3f} B parameters) in {time.perf_counter() - start:.0f} s")

    command = [
        sys.executable,
        "-m",
        "weights_conversion.to_flax",
        "--src",
        str(src),
        "--out",
        str(args.workdir / "flax"),
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    size = src.stat().st_size
    result = {
        "command": " ".join(command[1:]),
        "file_bytes": size,
        "peak_rss_bytes": peak,
        "peak_over_file": round(peak / size, 3),
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {platform.system()}",
    }
    print(json.dumps(result, indent=2))
    print(
        f"| {args.format} g/14{suffix} | {size / 1e9:.2f} GB | {peak / 1e9:.2f} GB | "
        f"{peak / size:.2f}x | {seconds:.0f} s |"
    )
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
