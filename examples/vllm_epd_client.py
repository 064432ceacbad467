"""Encode images with vitserve for a vLLM instance that runs as an encoder-cache consumer.

    vitserve serve --model /models/Qwen3-VL-8B-Instruct --devices cuda:0 &
    vllm serve /models/Qwen3-VL-8B-Instruct --ec-transfer-config \\
        '{"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
          "ec_connector_extra_config": {"shared_storage_path": "/shared/ec"}}' &
    python examples/vllm_epd_client.py --vitserve ipc:///run/user/1000/vitserve.sock --ec-dir /shared/ec \\
        --vllm http://localhost:8000 --model /models/Qwen3-VL-8B-Instruct photo.jpg "What is in the picture?"

Each image is encoded by vitserve and stored under a fresh uuid in the consumer's
shared_storage_path (vitserve.integrations.vllm_files); the chat request then carries, per image,
only its grid and that uuid, so vLLM loads the rows instead of running its vision tower.
`--dry-run` prints the request instead of sending it.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from pathlib import Path

from vitserve import Client
from vitserve.cli import read_input
from vitserve.integrations.vllm_files import ECFileStore


def image_part(key: str, grid: tuple[int, int, int]) -> dict:
    """An image the consumer takes from its encoder cache: the key and the grid its rows were made with."""
    return {"type": "image_embeds", "image_embeds": {"image_grid_thw": list(grid)}, "uuid": key}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vitserve", required=True, help="the endpoint `vitserve serve` printed")
    parser.add_argument("--ec-dir", required=True, help="the consumer's shared_storage_path")
    parser.add_argument("--vllm", default="http://localhost:8000", help="the consumer's OpenAI-compatible server")
    parser.add_argument("--model", required=True, help="the model name the consumer serves")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dry-run", action="store_true", help="print the request, do not send it")
    parser.add_argument("images", nargs="+", type=Path, help="image files (or .npy uint8 arrays)")
    parser.add_argument("prompt")
    args = parser.parse_args(argv)

    store = ECFileStore(args.ec_dir, max_age_s=3600)
    pixels = [read_input(path) for path in args.images]
    with Client(args.vitserve) as client, client.encode(pixels) as result:
        parts = []
        for item in result.items:
            key = uuid.uuid4().hex
            store.put(key, item)  # written whole before the request below can name it
            parts.append(image_part(key, item.grid))
    request = {"model": args.model, "max_tokens": args.max_tokens,
               "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}]}
    if args.dry_run:
        print(json.dumps(request, indent=1))
        return 0
    sent = urllib.request.Request(f"{args.vllm.rstrip('/')}/v1/chat/completions", json.dumps(request).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(sent) as response:
        answer = json.load(response)
    print(answer["choices"][0]["message"]["content"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
