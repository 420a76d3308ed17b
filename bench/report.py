"""Shared parts of the benchmark scripts: config loading, machine description, CPU load,
peak memory and Markdown output.

The scripts import this module from their own folder (`bench/`), which Python puts first
on `sys.path` when it runs a script.
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Packages whose versions a report lists, when installed.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "torch", "numpy", "scipy")


def load_config(path: str | Path, overrides: list[str] = ()):
    """Return `get_config()` of the config file `path` with `section.field=value` overrides.

    Values are Python literals (`8`, `(56,56)`, `False`); anything else is a string.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config file {path} not found; pass --config configs/NAME.py")
    spec = importlib.util.spec_from_file_location(f"bench_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise SystemExit(f"error: --override {override!r} is invalid: use section.field=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, field = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if field not in node:
            raise SystemExit(f"error: --override {override!r}: the config has no field {key!r}")
        node[field] = value
    return config


def parse_image_size(text: str) -> tuple[int, int]:
    """Parse `224` or `224,196` (height, width) for an `--image_size` flag."""
    try:
        sides = tuple(int(side) for side in text.replace("x", ",").split(","))
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use N or H,W in pixels")
    return sides


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Add the config and CPU-load flags that every benchmark script takes."""
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "demo.py"),
        help="config file (default: configs/demo.py)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set a config field, for example model.encoder.depth=2; repeatable",
    )
    parser.add_argument(
        "--max_load",
        type=float,
        default=1.5,
        help="wait before measuring while the 1-minute load average is above this (default 1.5)",
    )
    parser.add_argument(
        "--max_wait",
        type=float,
        default=180.0,
        help="maximum wait for the load to drop, in seconds; 0 measures at once (default 180)",
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def machine_description() -> str:
    """Return one line: CPU model, core count, memory, OS, Python and package versions."""
    memory = memory_gib()
    parts = [
        f"{cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)",
        f"{memory:.0f} GiB memory" if memory else "memory unknown",
        f"{platform.system()} {platform.machine()}",
        f"Python {platform.python_version()}",
        ", ".join(f"{name} {version}" for name, version in package_versions().items()),
    ]
    return "; ".join(parts)


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def wait_for_low_load(max_load: float, max_wait: float) -> str:
    """Wait up to `max_wait` s for the 1-minute load average to fall to `max_load`.

    Returns a line for the report with the load before and after waiting. Call it before
    the benchmark's own work, which raises the load average itself.
    """
    before = load_text()
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - start < max_wait:
        time.sleep(5.0)
    waited = time.monotonic() - start
    after = load_text()
    probe = f"speed probe {speed_probe_ms():.0f} ms"
    if waited < 1.0:
        return f"load average (1/5/15 min) at start: {before}; {probe}"
    return (
        f"load average (1/5/15 min) at start: {before}; after waiting {waited:.0f} s: {after}; "
        f"{probe}"
    )


def _busy_ticks() -> int:
    # Fields of the aggregate "cpu" line: user nice system idle iowait irq softirq steal ...
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def _own_ticks() -> int:
    # utime, stime, cutime and cstime of /proc/self/stat (fields 14 to 17), after the name.
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15])


class OtherCpuUse:
    """Measure how many cores other processes kept busy between `start()` and `stop()`.

    The figure is the machine's busy time from /proc/stat less this process's own CPU time,
    over the wall time, so 0.0 means nothing else ran. `stop()` returns None off Linux and
    for intervals under `MIN_SECONDS`, which the kernel's 10 ms ticks cannot resolve.
    """

    MIN_SECONDS = 0.5

    def __init__(self):
        self._start = None

    def start(self) -> None:
        try:
            self._start = (time.monotonic(), _busy_ticks(), _own_ticks())
        except (OSError, ValueError, IndexError):
            self._start = None

    def stop(self) -> float | None:
        if self._start is None:
            return None
        wall0, busy0, own0 = self._start
        wall = time.monotonic() - wall0
        if wall < self.MIN_SECONDS:
            return None
        ticks = (_busy_ticks() - busy0) - (_own_ticks() - own0)
        return max(ticks, 0) / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9)


def speed_probe_ms(repeats: int = 3) -> float:
    """Return the median milliseconds of a fixed pure-Python loop on one core.

    Other virtual machines on the same host can slow this one down without showing in
    its /proc/stat. Comparing the probe between runs shows whether the machine itself
    was slower than usual.
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total = 0
        for value in range(1_000_000):
            total += value * value
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size (`ru_maxrss` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_text(value: float | None) -> str:
    """Format a byte count in GiB, or in MiB below 1 GiB."""
    if value is None:
        return "n/a"
    if value < 2**30:
        return f"{value / 2**20:.0f} MiB"
    return f"{value / 2**30:.2f} GiB"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """Return the command that started this process, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def print_report(title: str, sections: list[tuple[str, str]], notes: list[str]) -> None:
    """Print a Markdown report: title, command, machine, the sections and notes."""
    print(f"\n## {title}\n")
    print(f"```bash\n{command_line()}\n```\n")
    print(f"Machine: {machine_description()}.\n")
    for heading, body in sections:
        if heading:
            print(f"{heading}\n")
        print(f"{body}\n")
    for note in notes:
        print(f"- {note}")
    print(
        f"- speed probe at the end {speed_probe_ms():.0f} ms (`report.speed_probe_ms`: a fixed "
        "pure-Python loop on one core; a higher figure than usual means a slower machine)"
    )
    sys.stdout.flush()
