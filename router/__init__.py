"""zeropool's router side: wire protocol v1, the broker, and the Python clients."""

from router.client import (
    AsyncClient,
    BadRequest,
    Client,
    Embeddings,
    InternalError,
    NoReply,
    Overloaded,
    Ping,
    RequestTimeout,
    ShuttingDown,
    Similarity,
    TooLarge,
    UnknownVersion,
    WorkerFailed,
    ZeroPoolError,
    verdict,
)

__all__ = [
    "AsyncClient", "BadRequest", "Client", "Embeddings", "InternalError", "NoReply",
    "Overloaded", "Ping", "RequestTimeout", "ShuttingDown", "Similarity", "TooLarge",
    "UnknownVersion", "WorkerFailed", "ZeroPoolError", "verdict",
]
