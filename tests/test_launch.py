"""Tests of the multi-host launch scripts in launch/, through their --dry-run output.

Every script runs under the real bash with PATH set to an empty folder, so the dry runs
prove that they need neither gcloud, git nor SLURM.
"""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_SCRIPT = LAUNCH / "tpu_pod.sh"
SLURM_SCRIPT = LAUNCH / "slurm_gpu.sh"
BASH = shutil.which("bash")
HEREDOC_END = "LASEG_SBATCH_EOF"

# Training arguments that need quoting on their way through ssh and srun.
SPACED_ARG = "--config.data.image_size=(224, 224)"
QUOTE_ARG = "--config.model.encoder.checkpoint=/mnt/shared/it's here"
TRAIN_ARGS = ["--config.mesh.fsdp=16", SPACED_ARG, QUOTE_ARG]

TPU_ARGS = [
    "--zone=us-west4-a",
    "--tpu-name",
    "laseg",
    "--accelerator-type",
    "v5litepod-16",
    "--workdir",
    "/mnt/shared/runs/giant",
    "--data-root=/mnt/shared/data",
]
SLURM_ARGS = [
    "--nodes",
    "4",
    "--gpus-per-node=8",
    "--partition",
    "gpu",
    "--time=2-00:00:00",
    "--cpus-per-task",
    "32",
    "--sbatch-arg=--exclusive",
    "--venv",
    "/shared/venvs/lasegjax",
    "--workdir",
    "/shared/runs/giant",
    "--data-root",
    "/shared/data",
]


@pytest.fixture
def empty_path(tmp_path) -> Path:
    folder = tmp_path / "empty_bin"
    folder.mkdir()
    return folder


def run_script(script, args, empty_path, extra_env=None) -> subprocess.CompletedProcess:
    """Run a launch script with bash, PATH set to an empty folder and no LASEG_* variables."""
    env = {"PATH": str(empty_path), "HOME": str(empty_path.parent), "TMPDIR": "/tmp"}
    env.update(extra_env or {})
    return subprocess.run(
        [BASH, str(script), *args],
        env=env,
        cwd=empty_path.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )


def dry_run(script, args, empty_path, extra_env=None) -> str:
    result = run_script(script, ["--dry-run", *args], empty_path, extra_env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def command_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line and not line.startswith("#")]


def gcloud_command_value(line: str) -> str:
    """Return the --command value of a printed `gcloud ... ssh` line."""
    return next(
        word.removeprefix("--command=")
        for word in shlex.split(line)
        if word.startswith("--command=")
    )


def shell_words(text: str) -> list[str]:
    """Split shell code into words and the operators ; | & ( ) as separate tokens."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def tpu_all_lines(empty_path, *extra) -> list[str]:
    return command_lines(
        dry_run(TPU_SCRIPT, [*TPU_ARGS, *extra, "all", "--", *TRAIN_ARGS], empty_path)
    )


def find_line(lines, fragment) -> str:
    matches = [line for line in lines if fragment in line]
    assert matches, f"no line contains {fragment!r}:\n" + "\n".join(lines)
    return matches[0]


def split_sbatch_output(output: str) -> tuple[list[str], str]:
    """Return the command lines around the here-document and the sbatch script inside it."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cat >"))
    end = lines.index(HEREDOC_END)
    commands = [*lines[: start + 1], *lines[end + 1 :]]
    return commands, "\n".join(lines[start + 1 : end]) + "\n"


# --- tpu_pod.sh ---


def test_tpu_all_stage_order(empty_path):
    lines = tpu_all_lines(empty_path)
    expected = [
        "gcloud compute tpus tpu-vm create laseg",
        "git -C",
        "gcloud compute tpus tpu-vm scp",
        "tar -xzf lasegjax.tar.gz",
        "pip install -e .",
        "lasegjax.main",
        "mkdir -p tpu-logs/laseg",
        "--output-directory=",
        "gcloud compute tpus tpu-vm delete laseg",
    ]
    positions = [lines.index(find_line(lines, fragment)) for fragment in expected]
    assert positions == sorted(positions)
    assert len(lines) == len(expected)


def test_tpu_create_command(empty_path):
    words = shlex.split(find_line(tpu_all_lines(empty_path), "tpu-vm create"))
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "laseg"]
    assert "--zone=us-west4-a" in words
    assert "--accelerator-type=v5litepod-16" in words
    assert "--version=v2-alpha-tpuv5-lite" in words
    assert "--spot" not in words


def test_tpu_copy_archives_head(empty_path):
    lines = tpu_all_lines(empty_path)
    archive = shlex.split(find_line(lines, "git -C"))
    assert archive == [
        "git",
        "-C",
        str(REPO),
        "archive",
        "--format=tar.gz",
        "--output=/tmp/lasegjax-laseg.tar.gz",
        "HEAD",
    ]
    scp = shlex.split(find_line(lines, "tpu-vm scp"))
    assert scp[5:7] == ["/tmp/lasegjax-laseg.tar.gz", "laseg:lasegjax.tar.gz"]
    assert "--worker=all" in scp


def test_tpu_ssh_targets_all_workers(empty_path):
    ssh_lines = [line for line in tpu_all_lines(empty_path) if "tpu-vm ssh" in line]
    assert len(ssh_lines) == 4
    for line in ssh_lines:
        assert "--worker=all" in shlex.split(line)


def test_tpu_install_command(empty_path):
    remote = gcloud_command_value(find_line(tpu_all_lines(empty_path), "pip install"))
    assert remote == 'cd lasegjax && python3 -m pip install -e . "jax[tpu]"'


def test_tpu_run_passes_train_args(empty_path):
    remote = gcloud_command_value(find_line(tpu_all_lines(empty_path), "lasegjax.main"))
    words = shell_words(remote)
    start = words.index("python3")
    assert words[start : words.index(";", start)] == [
        "python3",
        "-m",
        "lasegjax.main",
        "--distributed=on",
        "--config=configs/giant.py",
        "--workdir=/mnt/shared/runs/giant",
        "--config.data.root=/mnt/shared/data",
        *TRAIN_ARGS,
    ]


def test_tpu_run_tees_worker_log(empty_path):
    remote = gcloud_command_value(find_line(tpu_all_lines(empty_path), "lasegjax.main"))
    assert remote.startswith("set -o pipefail;")
    assert remote.endswith("2>&1 | tee -a ../lasegjax-logs/train.log")


def test_tpu_logs_gathered_per_worker(empty_path):
    words = shlex.split(find_line(tpu_all_lines(empty_path), "--output-directory="))
    assert "--command=cat lasegjax-logs/train.log" in words
    assert "--output-directory=tpu-logs/laseg" in words
    assert "--worker=all" in words


def test_tpu_delete_is_last(empty_path):
    words = shlex.split(tpu_all_lines(empty_path)[-1])
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "laseg"]
    assert "--quiet" in words


def test_tpu_keep_skips_delete(empty_path):
    lines = tpu_all_lines(empty_path, "--keep")
    assert not [line for line in lines if " delete " in line]
    assert "--output-directory=" in lines[-1]


def test_tpu_queued_spot_commands(empty_path):
    lines = tpu_all_lines(
        empty_path, "--queued", "--spot", "--valid-until-duration=6h", "--project=my-project"
    )
    create = shlex.split(lines[0])
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "laseg-qr"]
    for flag in [
        "--node-id=laseg",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--valid-until-duration=6h",
        "--spot",
    ]:
        assert flag in create
    describe = shlex.split(lines[1])
    assert describe[4:6] == ["describe", "laseg-qr"]
    assert "--format=value(state.state)" in describe
    delete = shlex.split(lines[-1])
    assert delete[3:6] == ["queued-resources", "delete", "laseg-qr"]
    assert "--force" in delete
    for line in lines:
        if line.startswith("gcloud"):
            assert "--project=my-project" in shlex.split(line)


def test_tpu_runtime_version_defaults(empty_path):
    expected = {
        "v6e-16": "v2-alpha-tpuv6e",
        "v5p-16": "v2-alpha-tpuv5",
        "v5litepod-16": "v2-alpha-tpuv5-lite",
        "v4-32": "tpu-ubuntu2204-base",
    }
    for accelerator, version in expected.items():
        args = ["--zone=z", "--tpu-name=t", f"--accelerator-type={accelerator}", "create"]
        assert f"--version={version}" in dry_run(TPU_SCRIPT, args, empty_path)


def test_tpu_stages_run_in_given_order(empty_path):
    output = dry_run(TPU_SCRIPT, ["--zone=z", "--tpu-name=t", "logs", "delete"], empty_path)
    lines = command_lines(output)
    assert [shlex.split(line)[:5] for line in lines] == [
        ["mkdir", "-p", "tpu-logs/t"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete"],
    ]


def test_tpu_environment_sets_defaults(empty_path):
    env = {
        "LASEG_ZONE": "europe-west4-a",
        "LASEG_TPU_NAME": "from-env",
        "LASEG_WORKDIR": "/mnt/env/run",
        "LASEG_CONFIG": "configs/large.py",
    }
    remote = gcloud_command_value(dry_run(TPU_SCRIPT, ["run"], empty_path, env))
    assert "--distributed=on --config=configs/large.py --workdir=/mnt/env/run;" in remote


def test_tpu_lines_are_shell_commands(empty_path):
    for line in tpu_all_lines(empty_path, "--queued"):
        assert shlex.split(line)[0] in {"gcloud", "git", "mkdir"}


def test_tpu_dry_run_output_parses(empty_path):
    output = dry_run(TPU_SCRIPT, [*TPU_ARGS, "--queued", "all", "--", *TRAIN_ARGS], empty_path)
    result = subprocess.run([BASH, "-n"], input=output, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tpu-name=t", "logs"], "missing --zone"),
        (["--zone=z", "logs"], "missing --tpu-name"),
        (["--zone=z", "--tpu-name=t", "create"], "missing --accelerator-type"),
        (["--zone=z", "--tpu-name=t", "run"], "missing --workdir"),
        (["--zone=z", "--tpu-name=t", "--workdir=runs/x", "run"], "--workdir must be an absolute"),
        (["--zone=z", "--tpu-name=t"], "missing STAGE"),
        (["--zone=z", "--tpu-name=t", "launch"], "unknown stage 'launch'"),
        (["--zone=z", "--tpu-name=t", "copy", "all"], "cannot be combined"),
        (["--zoen=z", "--tpu-name=t", "logs"], "unknown option --zoen"),
        (["--tpu-name=t", "logs", "--zone"], "option --zone needs a value"),
        (["--zone=z", "--tpu-name=t", "--spot=yes", "logs"], "option --spot takes no value"),
        (["--zone=z", "--tpu-name=t", "--accelerator-type=v9-8", "create"], "--runtime-version"),
    ],
)
def test_tpu_usage_errors(empty_path, args, message):
    result = run_script(TPU_SCRIPT, ["--dry-run", *args], empty_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "tpu_pod.sh --help" in result.stderr
    assert result.stdout == ""


def test_tpu_without_gcloud_fails_clearly(empty_path):
    result = run_script(TPU_SCRIPT, ["--zone=z", "--tpu-name=t", "logs"], empty_path)
    assert result.returncode == 1
    assert "gcloud not found on PATH" in result.stderr


def test_tpu_help(empty_path):
    result = run_script(TPU_SCRIPT, ["--help"], empty_path)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: tpu_pod.sh")


# --- slurm_gpu.sh ---


def slurm_dry_run(empty_path, *extra) -> tuple[list[str], str]:
    output = dry_run(SLURM_SCRIPT, [*SLURM_ARGS, *extra, "--", *TRAIN_ARGS], empty_path)
    return split_sbatch_output(output)


def test_slurm_commands(empty_path):
    commands, _ = slurm_dry_run(empty_path)
    assert commands == [
        "mkdir -p /shared/runs/giant/slurm",
        f"cat >/shared/runs/giant/slurm/lasegjax.sbatch <<'{HEREDOC_END}'",
        "sbatch /shared/runs/giant/slurm/lasegjax.sbatch",
    ]


def test_slurm_sbatch_directives(empty_path):
    _, script = slurm_dry_run(empty_path)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=lasegjax",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --output=/shared/runs/giant/slurm/%x-%j.out",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --exclusive",
    ]


def test_slurm_srun_launches_trainer(empty_path):
    _, script = slurm_dry_run(empty_path)
    srun = find_line(script.splitlines(), "srun ")
    assert srun.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1")
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in srun
    assert script.rstrip().endswith('\' lasegjax-task "${train[@]}"')
    assert 'tee -a "$log"' in script
    assert "source /shared/venvs/lasegjax/bin/activate" in script.splitlines()


def test_slurm_train_args_round_trip(empty_path):
    _, script = slurm_dry_run(empty_path)
    train_line = find_line(script.splitlines(), "train=(")
    result = subprocess.run(
        [BASH, "-c", train_line + '\nprintf "%s\\0" "${train[@]}"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split("\0")[:-1] == [
        "python3",
        "-m",
        "lasegjax.main",
        "--config=configs/giant.py",
        "--workdir=/shared/runs/giant",
        "--config.data.root=/shared/data",
        *TRAIN_ARGS,
    ]


def test_slurm_environment(empty_path):
    _, script = slurm_dry_run(empty_path)
    lines = script.splitlines()
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in lines
    assert [line for line in lines if line.startswith("# export NCCL_")]
    assert not [line for line in lines if line.startswith("export NCCL_")]
    assert "JAX_COORDINATOR_PORT=" not in script


def test_slurm_auto_detection_by_default(empty_path):
    _, script = slurm_dry_run(empty_path)
    assert "--coordinator_address" not in script
    assert "--process_id" not in script


def test_slurm_explicit_coordinator(empty_path):
    _, script = slurm_dry_run(empty_path, "--explicit-coordinator", "--coordinator-port=23456")
    assert "export JAX_COORDINATOR_PORT=23456" in script.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    launch = find_line(script.splitlines(), '"$@"')
    assert '--coordinator_address="$LASEG_COORDINATOR"' in launch
    assert '--num_processes="$SLURM_NTASKS"' in launch
    assert '--process_id="$SLURM_PROCID"' in launch


def test_slurm_script_syntax(empty_path, tmp_path):
    for extra in [(), ("--explicit-coordinator", "--setup=module load cuda")]:
        _, script = slurm_dry_run(empty_path, *extra)
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        result = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_slurm_dry_run_output_writes_script(empty_path, tmp_path):
    workdir = tmp_path / "shared" / "run"
    args = ["--nodes=2", "--gpus-per-node=4", f"--workdir={workdir}", "--", *TRAIN_ARGS]
    output = dry_run(SLURM_SCRIPT, args, empty_path)
    commands, script = split_sbatch_output(output)
    without_sbatch = output[: output.rindex("sbatch ")]
    subprocess.run([BASH, "-c", without_sbatch], check=True, cwd=tmp_path)
    assert (workdir / "slurm" / "lasegjax.sbatch").read_text() == script
    assert commands[-1] == f"sbatch {workdir}/slurm/lasegjax.sbatch"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus-per-node=8", "--workdir=/w"], "missing --nodes"),
        (["--nodes=2", "--workdir=/w"], "missing --gpus-per-node"),
        (["--nodes=2", "--gpus-per-node=8"], "missing --workdir"),
        (["--nodes=0", "--gpus-per-node=8", "--workdir=/w"], "--nodes must be a positive"),
        (["--nodes=2", "--gpus-per-node=8", "--workdir=runs/w"], "--workdir must be an absolute"),
        (
            ["--nodes=2", "--gpus-per-node=8", "--workdir=/w", "--coordinator-port=70000"],
            "--coordinator-port must be a port number",
        ),
        (["--nodes=2", "--gpus-per-node=8", "--workdir=/w", "extra"], "unknown argument extra"),
    ],
)
def test_slurm_usage_errors(empty_path, args, message):
    result = run_script(SLURM_SCRIPT, ["--dry-run", *args], empty_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "slurm_gpu.sh --help" in result.stderr
    assert result.stdout == ""


def test_slurm_without_sbatch_fails_clearly(empty_path):
    args = ["--nodes=2", "--gpus-per-node=8", "--workdir=/w"]
    result = run_script(SLURM_SCRIPT, args, empty_path)
    assert result.returncode == 1
    assert "sbatch not found on PATH" in result.stderr


# --- both ---


def test_dry_run_path_lacks_tools(empty_path):
    for tool in ["gcloud", "sbatch", "srun", "git"]:
        assert shutil.which(tool, path=str(empty_path)) is None


def test_launch_scripts_bash_syntax():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert [path.name for path in scripts] == ["lib.sh", "slurm_gpu.sh", "tpu_pod.sh"]
    for path in scripts:
        result = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_shellcheck(empty_path, tmp_path):
    _, script = slurm_dry_run(empty_path, "--explicit-coordinator")
    generated = tmp_path / "job.sbatch"
    generated.write_text(script)
    paths = [*sorted(LAUNCH.glob("*.sh")), generated]
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, paths)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout
