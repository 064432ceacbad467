"""`vitserve` command line."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from vitserve.choices import ATTENTION_BACKENDS, DEFAULT_MODEL, DTYPES
from vitserve.log_lines import FORMAT_ENV, FORMATS, configure_logging

# No torch at import: `vitserve serve` starts its GPU workers before this process imports it (launch.py).

# The sizes of the named workloads in DESIGN.md, as synthetic inputs for `--demo`.
DEMO_IMAGE_SIZES = ((224, 224), (336, 336), (448, 448), (672, 672), (1008, 1008), (480, 640))
DEMO_VIDEO_SHAPE = (16, 448, 448)


def read_input(path: Path) -> np.ndarray:
    """An image file (decoded by Pillow, as RGB) or a .npy uint8 array (H×W×3 or T×H×W×3)."""
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise OSError(f"not a numeric .npy array (expected uint8 H×W×3 or T×H×W×3): {err}") from err
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def demo_inputs(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Smooth synthetic pictures with noise: deterministic, no files needed."""
    from vitserve.bench.workloads import synthetic_item

    rng = np.random.default_rng(seed)
    items = [(f"demo-image-{h}x{w}", synthetic_item((h, w), rng)) for h, w in DEMO_IMAGE_SIZES]
    frames, height, width = DEMO_VIDEO_SHAPE
    items.append((f"demo-video-{frames}x{height}x{width}", synthetic_item(DEMO_VIDEO_SHAPE, rng)))
    return items


def checksum(values) -> str:
    return hashlib.sha256(values.float().cpu().numpy().tobytes()).hexdigest()[:16]


def run_encode(args: argparse.Namespace) -> int:
    from vitserve.models import load_model
    from vitserve.preprocess import PreprocessError, preprocess_image, preprocess_video

    if not args.files and not args.demo:
        print("vitserve encode: give image files (or .npy arrays), or --demo", file=sys.stderr)
        return 2
    items = demo_inputs() if args.demo else [(str(p), None) for p in args.files]
    started = time.perf_counter()
    import torch

    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"model {args.model} on {args.device}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, attention {model.attention_backend}, loaded in {time.perf_counter() - started:.1f} s")
    failures = 0
    for name, array in items:
        try:
            array = read_input(Path(name)) if array is None else array
            patches = (preprocess_video(array, model.preprocess) if array.ndim == 4
                       else preprocess_image(array, model.preprocess))  # (the checkpoint's own settings)
        except (OSError, PreprocessError) as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            failures += 1
            continue
        started = time.perf_counter()
        out = model.encode_patches(patches.pixel_values, patches.grid_thw)
        elapsed = (time.perf_counter() - started) * 1e3
        t, h, w = patches.grid_thw[0].tolist()
        print(f"{name}: grid {t}x{h}x{w} -> embeddings {tuple(out.embeddings.shape)}, deepstack "
              f"{tuple(out.deepstack.shape)}, sum {out.embeddings.double().sum().item():+.6e}, "
              f"sha256 {checksum(out.embeddings)}, {elapsed:.1f} ms")
    return 1 if failures else 0


def run_bench(args: argparse.Namespace) -> int:
    from vitserve.bench import report
    from vitserve.bench.runner_bench import METHODS
    from vitserve.bench.runner_bench import run_bench as bench
    from vitserve.bench.workloads import WORKLOADS

    names = [n for n, w in WORKLOADS.items() if w.named] if args.workloads == "all" else args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"vitserve bench: unknown workloads {unknown}; choose from {list(WORKLOADS)}", file=sys.stderr)
        return 2
    if args.endpoint or args.compare_policies or args.overhead or args.served or args.scaling:
        from vitserve.bench import load_cli

        args.workloads = ",".join(names)
        try:
            window = window_config(args)
        except ValueError as err:
            return load_cli.fail(str(err))
        return load_cli.run(args, window)
    import torch

    if not torch.cuda.is_available():
        print("vitserve bench: needs a CUDA device (it times CUDA graphs against eager baselines)", file=sys.stderr)
        return 2
    if args.requests < 2:
        print("vitserve bench: --requests must be at least 2 (p99 needs several samples)", file=sys.stderr)
        return 2
    try:
        window = window_config(args)
    except ValueError as err:
        print(f"vitserve bench: --budgets/--extra-budgets: {err}", file=sys.stderr)
        return 2
    methods = tuple(args.methods.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"vitserve bench: unknown methods {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    try:
        result = bench(args.model, names, args.requests, methods, window=window, attention=args.attention)
    except ValueError as err:  # capacities or model source the user can fix
        print(f"vitserve bench: {err}", file=sys.stderr)
        return 2
    print(report.table(result))
    for path in report.write(result, args.out):
        print(f"wrote {path}")
    return 0


def window_config(args: argparse.Namespace):
    from vitserve.workers import WindowConfig

    budgets = tuple(int(b) for b in args.budgets.split(",")) if args.budgets else None
    extra = tuple(int(b) for b in args.extra_budgets.split(",")) if args.extra_budgets else ()
    return WindowConfig(budgets=budgets, min_budget=args.min_budget, max_budget=args.max_budget, extra_budgets=extra)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", help="explicit comma-separated token budgets (default: derived from min/max)")
    parser.add_argument("--extra-budgets", help="comma-separated budgets added to the derived ones: exact fits for "
                        "common item sizes, e.g. 784 for 448x448 images")
    parser.add_argument("--min-budget", type=int, default=256, help="smallest derived token budget (a graph each)")
    parser.add_argument("--max-budget", type=int, default=8192, help="largest derived token budget: larger windows "
                        "are split, larger items run eagerly")


class HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """-v, -q and --log-format, before the command or after it (SUPPRESS: a command's parser must not
    reset a flag given before the command to its default)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at INFO level (default: warnings and errors)")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="log errors only")
    parser.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                        help="stderr as text lines, or one JSON object per line (default: text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitserve", description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--version", action="version", version=f"vitserve {package_version()}")
    add_log_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="encode image files and print shapes and checksums")
    encode.add_argument("files", nargs="*", type=Path, help="image files, or .npy uint8 arrays (videos: T×H×W×3)")
    encode.add_argument("--demo", action="store_true", help="encode built-in synthetic images and a video")
    encode.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or preset (default {DEFAULT_MODEL})")
    encode.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    encode.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 elsewhere")
    encode.set_defaults(handler=run_encode)
    bench = commands.add_parser("bench", help="time the named workloads: HF eager, torch.compile, vitserve eager and graphs")
    bench.add_argument("--model", default="random:qwen3-vl-8b", help="checkpoint directory or preset")
    bench.add_argument("--workloads", default="all", help="comma-separated names, or all")
    bench.add_argument("--requests", type=int, default=40, help="requests per workload")
    bench.add_argument("--attention", choices=ATTENTION_BACKENDS, help="vitserve's attention backend (default: best available)")
    add_budget_arguments(bench)
    bench.add_argument("--methods", default="hf-eager,hf-compile,vitserve-eager,vitserve-graphs",
                       help="comma-separated: hf-eager, hf-compile (torch.compile of the HF model), vitserve-eager, "
                            "vitserve-graphs")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench.json/.txt/.png")
    from vitserve.bench.load_cli import add_arguments

    add_arguments(bench)
    bench.set_defaults(handler=run_bench)
    demo = commands.add_parser("demo", help="start `vitserve serve`, encode the built-in images and video through a "
                               "client, print where their rows are and how they were packed, and stop")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or preset")
    demo.add_argument("--devices", default="cpu", help="comma-separated torch devices, e.g. cuda:0")
    demo.set_defaults(handler=_run_demo)
    from vitserve.cli_serve import add_keys_parser, add_serve_parser

    from vitserve.soak.cli import add_soak_parser

    add_serve_parser(commands)
    add_keys_parser(commands)
    add_soak_parser(commands)
    for name, command in commands.choices.items():
        command.formatter_class = HelpWithDefaults
        add_log_arguments(command)
        command.add_argument("--config", type=Path, help=f"a TOML file whose [{name}] table sets this command's "
                             f"flags; VITSERVE_<FLAG> environment variables override it, flags override both")
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vitserve")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def _run_demo(args: argparse.Namespace) -> int:
    from vitserve.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    from vitserve.cli_config import ENV_PREFIX, SettingsError, settings_defaults

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None or any(name.startswith(ENV_PREFIX) for name in os.environ):
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        try:
            command.set_defaults(**settings_defaults(command, args.command, args.config))
        except SettingsError as err:
            print(f"vitserve {args.command}: {err}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)  # the flags given, over the file's and the environment's settings
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        print("vitserve: -v (--verbose) and -q (--quiet) contradict each other: give one", file=sys.stderr)
        return 2
    if getattr(args, "log_format", None):  # (an environment's VITSERVE_LOG_FORMAT stands otherwise)
        os.environ[FORMAT_ENV] = args.log_format  # worker processes inherit it
    configure_logging(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
