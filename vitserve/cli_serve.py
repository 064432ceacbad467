"""`vitserve serve` and `vitserve keys`: their flags, and the engine's configuration from them."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple

from vitserve.choices import DEFAULT_MODEL, DTYPES


def add_serve_parser(commands) -> None:
    from vitserve.cli import add_budget_arguments

    serve = commands.add_parser("serve", help="run the engine behind a ZeroMQ endpoint until SIGINT/SIGTERM")
    serve.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or preset (default {DEFAULT_MODEL})")
    serve.add_argument("--devices", default="cpu", help="comma-separated torch devices, one worker each, e.g. cuda:0,cuda:1")
    serve.add_argument("--endpoint", help="ipc://PATH (local, shared memory) or tcp://HOST:PORT (outputs inline); "
                       "default: ipc://$XDG_RUNTIME_DIR/vitserve.sock when that is set, else "
                       f"ipc:///tmp/vitserve-{os.getuid()}/vitserve.sock (its directory made with mode 0700). "
                       "An endpoint that another engine serves is refused; the socket file is removed on exit")
    serve.add_argument("--http-port", type=int, help="serve Prometheus metrics (/metrics), liveness (/livez) and "
                       "readiness (/readyz) over HTTP on this port (default: no HTTP)")
    serve.add_argument("--http-host", default="127.0.0.1", help="the address --http-port listens on (0.0.0.0: all)")
    serve.add_argument("--socket-mode", default="0600", help="octal permissions of the ipc:// socket file, whatever "
                       "the umask (default 0600: only you; 0660 lets your group connect)")
    serve.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 elsewhere")
    add_budget_arguments(serve)
    serve.add_argument("--policy", default="deadline", choices=("deadline", "immediate", "max_delay"),
                       help="when a window goes: deadline-aware flushing, at once, or after a fixed wait")
    serve.add_argument("--max-queued-items", type=int, default=4096,
                       help="items waiting for a window; past it new requests get overloaded")
    serve.add_argument("--max-queued-tokens", type=int, default=4 * 1024 * 1024,
                       help="patch tokens waiting for a window; past it new requests get overloaded")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 30,
                       help="input bytes of one request; larger ones get too_large")
    serve.add_argument("--lease-timeout-s", type=float, default=300.0,
                       help="results not released this long after delivery are reclaimed (0: never)")
    serve.add_argument("--output-windows", type=int, default=16,
                       help="shared-memory output per worker, in windows of the largest budget")
    serve.add_argument("--max-item-tokens", type=int, help="largest item in patch tokens (default: the most the "
                       "pixel limits give one item, at least twice the largest budget, within --max-item-output-bytes); "
                       "larger ones get too_large")
    serve.add_argument("--max-item-output-bytes", type=int, default=1 << 30,
                       help="what the default --max-item-tokens may give one item's outputs in each worker's shared "
                       "memory (Kimi K2.5's processor bounds frames, not clips)")
    serve.add_argument("--worker-restarts", type=int, default=3,
                       help="start attempts for a worker that died before it is given up (0: never restart)")
    serve.add_argument("--window-timeout-s", type=float, default=60.0,
                       help="a window running longer means a stuck worker: it is killed and restarted (0: no watchdog)")
    serve.add_argument("--worker-heartbeat-s", type=float, default=1.0,
                       help="how often a worker proves it is alive; one silent for three beats is restarted")
    serve.add_argument("--readiness-probe-s", type=float, default=5.0,
                       help="a worker with no window for this long runs a small forward to show it still serves "
                       "(0: no probes)")
    serve.add_argument("--readiness-timeout-s", type=float, default=10.0,
                       help="a probe unanswered this long, or a window this long past its worker's predicted end, "
                            "makes the worker unready (/readyz, health) until it answers")
    serve.add_argument("--busy-poll-ms", type=float,
                       help="how long the engine and its workers poll for an expected message (a window's reply, "
                       "a sequential client's next request) instead of sleeping: a woken process costs tens to "
                       "hundreds of µs (0: never poll; default: 2 with GPU workers on 8 cores or more, else 0)")
    serve.add_argument("--drain-timeout-s", type=float, default=30.0,
                       help="on SIGTERM, how long admitted requests may take to finish")
    serve.add_argument("--max-queued-bytes", type=int, default=4 << 30,
                       help="input bytes of all unfinished requests together; past it: overloaded")
    serve.add_argument("--cache-dir", help="where measured cost models are kept between starts (default "
                       "$XDG_CACHE_HOME/vitserve or ~/.cache/vitserve; 'none': measure at every start)")
    serve.add_argument("--standby-workers", action=argparse.BooleanOptionalAction,
                       help="keep a loaded spare process per worker so a restart skips loading the model "
                       "(default: on for GPUs, off for CPUs; it costs the model's memory once more)")
    serve.add_argument("--kept-timeout-s", type=float, default=300.0,
                       help="the longest an item stays kept under a name a client gave it (encode's keep=)")
    serve.add_argument("--kept-share", type=float, default=0.5,
                       help="of each worker's output rows that kept items may hold; past it the oldest are forgotten")
    serve.add_argument("--input-slab-bytes", type=int, help="shared memory that inputs received as frames are copied "
                       "into for the workers (default: 1 GiB, within --max-request-bytes and --max-queued-bytes)")
    _add_preprocess_arguments(serve)
    _add_client_limit_arguments(serve)
    _add_security_arguments(serve)
    serve.set_defaults(handler=run_serve)


# PreprocessConfig fields that a checkpoint's processor configs give and flags of the same names override
PREPROCESS_FLAGS = ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels", "max_video_frames",
                    "video_cap_pixels_per_frame", "video_max_frame_tokens")


def _add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "preprocessing", "by default the checkpoint's preprocessor_config.json and video_preprocessor_config.json "
        "(the released values of its family for a preset: Qwen3-VL's or GLM-4.xV's); these flags override them")
    group.add_argument("--image-min-pixels", type=int, help="resized pixels of an image, at least")
    group.add_argument("--image-max-pixels", type=int, help="resized pixels of an image, at most")
    group.add_argument("--video-min-pixels", type=int, help="resized pixels of a clip over all its frames, at least")
    group.add_argument("--video-max-pixels", type=int, help="resized pixels of a clip over all its frames, at most")
    group.add_argument("--max-video-frames", type=int, help="frames of one video; more are refused (sample them first)")
    group.add_argument("--video-cap-pixels-per-frame", action=argparse.BooleanOptionalAction,
                       help="the reference code's per-frame cap (Hugging Face's cap_pixels_per_frame): each frame "
                       "at most --video-max-frame-tokens merged patches or its share of --video-max-pixels")
    group.add_argument("--video-max-frame-tokens", type=int, help="with the per-frame cap: merged patches per frame")


def preprocess_overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in PREPROCESS_FLAGS if getattr(args, name) is not None}


def run_serve(args: argparse.Namespace) -> int:
    # `kill -USR1` prints every thread's stack on stderr (workers do the same): what a stuck server
    # is doing, without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # First, before this process imports torch (seconds): the GPU workers import, load the model
    # and wait for the engine meanwhile (launch.py). Settings refused below stop them.
    from vitserve.launch import launch_early

    early = launch_early(args.model, tuple(args.devices.split(",")), args.dtype, args.worker_heartbeat_s, True)
    try:
        return _run_serve(args, early)
    except BaseException:
        if early is not None:
            early.discard()
        raise


def _run_serve(args: argparse.Namespace, early) -> int:
    from vitserve.engine.connections import RESERVED_DESCRIPTORS, SHED_FACTOR, raise_descriptor_limit
    from vitserve.engine.serve import run
    from vitserve.ipc.auth import AuthError
    from vitserve.ipc.endpoints import EndpointError

    try:
        settings = serve_settings(args)
        raise_descriptor_limit(SHED_FACTOR * settings.config.clients.max_connections + RESERVED_DESCRIPTORS)
    except ValueError as err:
        if early is not None:
            early.discard()
        print(f"vitserve serve: {err}", file=sys.stderr)
        return 2
    try:
        return run(settings.config, settings.endpoint, settings.socket_mode, settings.keys, args.allow_insecure_tcp,
                   early, settings.http, freeze_gc=True)  # (this process is vitserve's own)
    except (EndpointError, AuthError) as err:  # raised before the engine starts: the endpoint is taken or unusable
        print(f"vitserve serve: {err}", file=sys.stderr)
        return 2


class ServeSettings(NamedTuple):
    config: Any  # EngineConfig
    endpoint: str
    socket_mode: int | None
    keys: Any  # ServerKeys | None
    http: tuple[str, int] | None


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Every setting of `serve` checked and built, in a second and before anything starts: a ValueError
    that names the setting otherwise."""
    from vitserve.cli import window_config
    from vitserve.engine import EngineConfig
    from vitserve.ipc.endpoints import default_endpoint, parse_socket_mode
    from vitserve.models.loading import check_source
    from vitserve.preprocess.in_force import preprocess_for
    from vitserve.scheduler import SchedulerConfig

    check_source(args.model)  # in a second, not after the workers' start (CheckpointError is a ValueError)
    window = window_config(args)
    scheduler = SchedulerConfig(policy=args.policy, max_queued_items=args.max_queued_items,
                                max_queued_tokens=args.max_queued_tokens)
    preprocess = preprocess_for(args.model, preprocess_overrides(args))
    config = EngineConfig(model=args.model, devices=tuple(args.devices.split(",")), dtype=args.dtype,
                          window=window, scheduler=scheduler, preprocess=preprocess,
                          output_windows=args.output_windows,
                          max_request_bytes=args.max_request_bytes, max_item_tokens=args.max_item_tokens,
                          max_item_output_bytes=args.max_item_output_bytes,
                          lease_timeout_s=args.lease_timeout_s or None, worker_restarts=args.worker_restarts,
                          window_timeout_s=args.window_timeout_s or None,
                          worker_heartbeat_s=args.worker_heartbeat_s, drain_timeout_s=args.drain_timeout_s,
                          readiness_probe_s=args.readiness_probe_s or None,
                          readiness_timeout_s=args.readiness_timeout_s,
                          max_queued_bytes=args.max_queued_bytes, input_slab_bytes=args.input_slab_bytes,
                          kept_timeout_s=args.kept_timeout_s, kept_share=args.kept_share,
                          standby_workers=args.standby_workers, busy_poll_ms=args.busy_poll_ms,
                          clients=_client_limits(args), progress=True,
                          **_cache_dir(args))
    socket_mode = parse_socket_mode(args.socket_mode)
    endpoint = args.endpoint or default_endpoint()
    keys = _server_keys(args)
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port {args.http_port} is not a port: give 1 to 65535 (0: any free one)")
    http = (args.http_host, args.http_port) if args.http_port is not None else None
    return ServeSettings(config, endpoint, socket_mode, keys, http)


def _add_client_limit_arguments(parser: argparse.ArgumentParser) -> None:
    from vitserve.engine.limits import ClientLimits

    defaults = ClientLimits()
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="client connections served at once; more are refused with overloaded")
    parser.add_argument("--max-requests-per-client", type=int, default=defaults.max_requests,
                        help="requests one connection may have unfinished or holding results")
    parser.add_argument("--client-queue-share", type=float, default=defaults.queue_share,
                        help="fraction of the queue's items, tokens and bytes one client may take")
    parser.add_argument("--client-output-share", type=float, default=defaults.output_share,
                        help="fraction of a worker's output rows one client's results may hold while others wait")
    parser.add_argument("--max-inline-bytes", type=int, default=defaults.max_inline_bytes,
                        help="inline result bytes (tcp://) sent to a client and not yet released by it")
    parser.add_argument("--priorities", default=f"{defaults.priorities[0]},{defaults.priorities[1]}",
                        help="LOW,HIGH: the priorities clients may ask for (lower is served first)")
    parser.add_argument("--input-arena-bytes", type=int, default=defaults.input_arena_bytes,
                        help="each local client's shared memory for its inputs (0: none, inputs go as frames)")
    parser.add_argument("--max-input-arenas", type=int, default=defaults.max_input_arenas,
                        help="input arenas at once; further local clients send their inputs as frames")


def _cache_dir(args: argparse.Namespace) -> dict:
    if args.cache_dir is None:
        return {}
    return {"cache_dir": None if args.cache_dir.lower() == "none" else args.cache_dir}


def _client_limits(args: argparse.Namespace):
    from vitserve.engine.limits import ClientLimits

    try:
        low, high = (int(value) for value in args.priorities.split(","))
    except ValueError:
        raise ValueError(f"--priorities must be two integers LOW,HIGH such as -100,100, got {args.priorities!r}") from None
    flags = {"max_connections": "--max-connections", "max_requests": "--max-requests-per-client",
             "queue_share": "--client-queue-share", "output_share": "--client-output-share",
             "max_inline_bytes": "--max-inline-bytes", "input_arena_bytes": "--input-arena-bytes",
             "max_input_arenas": "--max-input-arenas"}
    try:
        return ClientLimits(max_connections=args.max_connections, max_requests=args.max_requests_per_client,
                            queue_share=args.client_queue_share, output_share=args.client_output_share,
                            max_inline_bytes=args.max_inline_bytes, priorities=(low, high),
                            input_arena_bytes=args.input_arena_bytes, max_input_arenas=args.max_input_arenas)
    except ValueError as err:  # named by its field: say the flag that sets it
        field = str(err).split(" ", 1)[0]
        raise ValueError(f"{flags[field]} ({err})" if field in flags else str(err)) from None


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curve-secret-key", type=Path, help="the server's secret certificate (NAME.key_secret, "
                        "from `vitserve keys`): clients must then authenticate with CURVE")
    parser.add_argument("--curve-clients", type=Path, help="a folder of the public certificates (*.key) of the "
                        "clients allowed in (with --curve-secret-key)")
    parser.add_argument("--allow-insecure-tcp", action="store_true", help="serve a tcp:// endpoint that other "
                        "hosts can reach without authentication (refused otherwise)")


def _server_keys(args: argparse.Namespace):
    from vitserve.ipc.auth import ServerKeys

    if (args.curve_secret_key is None) != (args.curve_clients is None):
        raise ValueError("--curve-secret-key and --curve-clients go together: give both, or neither")
    return None if args.curve_secret_key is None else ServerKeys(args.curve_secret_key, args.curve_clients)


def add_keys_parser(commands) -> None:
    keys = commands.add_parser("keys", help="create a CURVE key pair (certificates) for a server or a client")
    keys.add_argument("directory", type=Path, help="where NAME.key (public) and NAME.key_secret go")
    keys.add_argument("name", help="e.g. server, or a client's name")
    keys.add_argument("--priorities", help="LOW,HIGH: the priorities this client may ask for (written into its "
                                           "certificate; the server's --priorities when absent)")
    keys.set_defaults(handler=run_keys)


def run_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    args.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (args.directory / f"{args.name}.key_secret").exists():
        print(f"vitserve keys: {args.directory / args.name}.key_secret exists: choose another name", file=sys.stderr)
        return 2
    from vitserve.ipc.auth import AuthError, parse_priorities, write_priorities

    try:
        priorities = None if args.priorities is None else parse_priorities(args.priorities, "--priorities")
    except AuthError as err:
        print(f"vitserve keys: {err}", file=sys.stderr)
        return 2
    public, secret = zmq.auth.create_certificates(args.directory, args.name)
    if priorities is not None:
        write_priorities(Path(public), *priorities)
    os.chmod(secret, 0o600)
    print(f"public certificate {public} (give it to the other side), secret {secret} (keep it private)")
    return 0
