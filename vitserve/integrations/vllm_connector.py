"""A vLLM encoder-cache (EC) connector that reads vitserve's kept items straight from shared memory.

    vllm serve /models/Qwen3-VL-8B-Instruct --ec-transfer-config '{
        "ec_connector": "VitserveECConnector",
        "ec_connector_module_path": "vitserve.integrations.vllm_connector",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"vitserve_endpoint": "ipc:///run/user/1000/vitserve.sock"}}'

A proxy encodes each item with `client.encode(items, keep=[uuid, ...])` and sends vLLM the request
that names each item by its grid and that uuid (docs/vllm.md). vLLM's scheduler asks this
connector whether vitserve keeps the uuid (`has_cache_item`); once vLLM decides to load it
(`update_state_after_alloc`), the scheduler side looks it up and holds it, so that nothing at
vitserve (forget, expiry, eviction) can take the rows away before the load; its worker copies the
rows from vitserve's shared memory into the encoder cache on its device (`start_load_caches`, one
copy, no files). When the request finishes, the hold ends, and an item no unfinished request loads
any more is forgotten at vitserve. vLLM's processes must run on the host of `vitserve serve`.
Written against the hooks of vLLM 0.33.0; with vLLM importable the class derives from its
`ECConnectorBase`, without it from a stand-in with the same hooks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from vitserve.engine.errors import EngineError
from vitserve.ipc.messages import OutputRef
from vitserve.ipc.outputs import Encoded

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


log = logging.getLogger(__name__)

ENDPOINT_SETTING = "vitserve_endpoint"  # in ec_connector_extra_config


@dataclass
class VitserveECMetadata(ECConnectorMetadata):
    """What the scheduler tells the workers for one step: the items to load, and where their rows lie
    (references the scheduler side holds until the requests finish)."""

    items: list[tuple[str, OutputRef]] = field(default_factory=list)


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
        # scheduler side
        self._to_load: list[tuple[str, OutputRef]] = []  # this step's items
        self._held: dict[str, list[tuple[str, Encoded]]] = {}  # request id -> its items' lookups, held until it ends
        self._loaders: dict[str, int] = {}  # item -> unfinished requests that load it

    def _vitserve(self):
        if self._client is None:
            from vitserve import Client

            self._client = Client(self._endpoint)
        return self._client

    # -- scheduler side ------------------------------------------------------------------------
    def has_cache_item(self, identifier: str) -> bool:
        try:
            with self._vitserve().lookup([identifier]) as found:
                return found.items[0] is not None
        except (EngineError, ConnectionError, OSError) as err:  # vitserve unreachable: vLLM treats it as a miss
            log.warning("vitserve at %s did not answer a lookup of %r: %s", self._endpoint, identifier, err)
            return False

    def update_state_after_alloc(self, request: Any, index: int) -> None:
        if not self.is_consumer:
            return
        name = request.mm_features[index].identifier
        try:
            found = self._vitserve().lookup([name])
        except (EngineError, ConnectionError, OSError) as err:
            log.warning("vitserve at %s did not answer a lookup of %r: %s", self._endpoint, name, err)
            return
        if found.items[0] is None:  # gone since has_cache_item
            found.release()
            return
        self._held.setdefault(request.request_id, []).append((name, found))
        self._loaders[name] = self._loaders.get(name, 0) + 1
        self._to_load.append((name, found.refs[0]))

    def build_connector_meta(self, scheduler_output: Any) -> VitserveECMetadata:
        meta, self._to_load = VitserveECMetadata(self._to_load), []
        return meta

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """The request's holds end; items no unfinished request loads any more are forgotten at vitserve
        (vLLM keeps its own copies)."""
        done = []
        for name, found in self._held.pop(request.request_id, []):
            found.release()
            self._loaders[name] -= 1
            if not self._loaders[name]:
                del self._loaders[name]
                done.append(name)
        if done:
            try:
                self._vitserve().forget(done)
            except (ConnectionError, OSError) as err:  # (they expire at vitserve anyway)
                log.warning("vitserve at %s did not take a forget: %s", self._endpoint, err)
        return False, None

    # -- worker side ---------------------------------------------------------------------------
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Copy this step's items from vitserve's shared memory into the encoder cache, on this
        worker's device: (rows, out_hidden * (1 + deepstack)) each, in the model's dtype. The
        scheduler side holds them until their requests finish."""
        metadata = self._get_connector_metadata()
        items = {name: ref for name, ref in getattr(metadata, "items", []) if name not in encoder_cache}
        if not items:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        client = self._vitserve()
        for name, ref in items.items():
            rows = client.view(ref).packed  # (rows, out_hidden * (1 + deepstack)), shared memory
            encoder_cache[name] = rows.to(device, self._dtype or rows.dtype, copy=True)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        return None  # a consumer saves nothing: vitserve is the encoder

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
