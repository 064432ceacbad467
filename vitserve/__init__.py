"""vitserve: a serving engine for the vision encoders of multimodal LLMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in torch and zmq; `import vitserve` alone stays light.
    if name in ("Engine", "EngineConfig", "EngineError"):
        from vitserve import engine

        return getattr(engine, name)
    if name == "AsyncClient":
        from vitserve.client import AsyncClient

        return AsyncClient
    if name == "ServedModel":
        from vitserve.ipc.messages import ServedModel

        return ServedModel
    if name == "Client":
        from vitserve.sync_client import Client

        return Client
    raise AttributeError(f"module 'vitserve' has no attribute {name!r}")
