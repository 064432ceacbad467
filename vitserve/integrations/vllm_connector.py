"""A vLLM encoder-cache (EC) connector that reads vitserve's kept items straight from shared memory.

    vllm serve /models/Qwen3-VL-8B-Instruct --ec-transfer-config '{
        "ec_connector": "VitserveECConnector",
        "ec_connector_module_path": "vitserve.integrations.vllm_connector",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"vitserve_endpoint": "ipc:///run/user/1000/vitserve.sock"}}'

A proxy encodes each item with `client.encode(items, keep=[uuid, ...])` and sends vLLM the request
that names each item by its grid and that uuid (docs/vllm.md). vLLM's scheduler asks this
connector whether vitserve keeps the uuid (`has_cache_item`), its worker copies the rows from
vitserve's shared memory into the encoder cache on its device (`start_load_caches`, one copy, no
files), and once no unfinished request names the uuid any more, the connector tells vitserve to
forget it (`request_finished`). Written against the hooks of vLLM 0.33.0; with vLLM importable the
class derives from its `ECConnectorBase`, without it from a stand-in with the same hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorMetadata
except ImportError:  # vLLM is not installed here: the hooks on plain classes (tests, documentation)
    class ECConnectorMetadata:  # noqa: D101 (stand-ins for vLLM's own)
        pass

    class ECConnectorBase:
        def __init__(self, vllm_config: Any, role: Any):
            transfer = vllm_config.ec_transfer_config
            if transfer is None:
                raise ValueError("ec_transfer_config must be set for an EC connector")
            self._vllm_config, self._role = vllm_config, role
            self._is_producer, self._is_consumer = transfer.is_ec_producer, transfer.is_ec_consumer
            self._connector_metadata = None

        @property
        def is_consumer(self) -> bool:
            return self._is_consumer

        @property
        def is_producer(self) -> bool:
            return self._is_producer

        def bind_connector_metadata(self, connector_metadata: ECConnectorMetadata) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self) -> ECConnectorMetadata:
            return self._connector_metadata

ENDPOINT_SETTING = "vitserve_endpoint"  # in ec_connector_extra_config


@dataclass
class VitserveECMetadata(ECConnectorMetadata):
    """What the scheduler tells the workers for one step: the items to load."""

    names: list[str] = field(default_factory=list)


class VitserveECConnector(ECConnectorBase):
    def __init__(self, vllm_config: Any, role: Any):
        super().__init__(vllm_config=vllm_config, role=role)
        if self.is_producer:
            raise ValueError("VitserveECConnector is for EC consumers (ec_role ec_consumer): vitserve itself is the "
                             "encoder, started with `vitserve serve`")
        transfer = vllm_config.ec_transfer_config
        self._endpoint = transfer.get_from_extra_config(ENDPOINT_SETTING, None)
        if not self._endpoint:
            raise ValueError(f"set ec_connector_extra_config.{ENDPOINT_SETTING} to the endpoint `vitserve serve` "
                             "printed, e.g. ipc:///run/user/1000/vitserve.sock")
        model_config = getattr(vllm_config, "model_config", None)
        self._dtype: torch.dtype | None = getattr(model_config, "dtype", None)  # vLLM's model dtype
        self._client = None
        self._to_load: list[str] = []  # this step's items (scheduler side)
        self._requests_of: dict[str, set[str]] = {}  # item -> unfinished requests that load it (scheduler side)

    def _vitserve(self):
        if self._client is None:
            from vitserve import Client

            self._client = Client(self._endpoint)
        return self._client

    # -- scheduler side ------------------------------------------------------------------------
    def has_cache_item(self, identifier: str) -> bool:
        with self._vitserve().lookup([identifier]) as found:
            return found.items[0] is not None

    def update_state_after_alloc(self, request: Any, index: int) -> None:
        name = request.mm_features[index].identifier
        if self.is_consumer and self.has_cache_item(name):
            self._to_load.append(name)
            self._requests_of.setdefault(name, set()).add(request.request_id)

    def build_connector_meta(self, scheduler_output: Any) -> VitserveECMetadata:
        meta, self._to_load = VitserveECMetadata(self._to_load), []
        return meta

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """Forget, at vitserve, the items no unfinished request loads any more (vLLM holds its copies)."""
        done = []
        for name, requests in list(self._requests_of.items()):
            requests.discard(request.request_id)
            if not requests:
                del self._requests_of[name]
                done.append(name)
        if done:
            self._vitserve().forget(done)
        return False, None

    # -- worker side ---------------------------------------------------------------------------
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Copy this step's items from vitserve's shared memory into the encoder cache, on this
        worker's device: (rows, out_hidden * (1 + deepstack)) each, in the model's dtype."""
        metadata = self._get_connector_metadata()
        names = [name for name in dict.fromkeys(getattr(metadata, "names", [])) if name not in encoder_cache]
        if not names:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        with self._vitserve().lookup(names) as found:
            for name, item in zip(names, found.items):
                if item is None:
                    raise RuntimeError(f"vitserve no longer keeps item {name!r} (forgotten, past its keep time, or "
                                       "evicted past --kept-share between vLLM's lookup and its load): encode it again")
                encoder_cache[name] = item.packed.to(device, self._dtype or item.packed.dtype, copy=True)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        return None  # a consumer saves nothing: vitserve is the encoder

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
