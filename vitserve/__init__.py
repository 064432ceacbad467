"""vitserve: a serving engine for the vision encoders of multimodal LLMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in torch and zmq; `import vitserve` alone stays light.
    if name in ("Engine", "EngineConfig", "EngineError"):
        from vitserve import engine

        return getattr(engine, name)
    if name in ("Client", "AsyncClient"):
        from vitserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'vitserve' has no attribute {name!r}")
