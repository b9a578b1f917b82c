"""zeropool's router side: wire protocol v1 (router.protocol), the Python clients
(router.client, with their Curve keys in router.keys) and the server's broker and ZAP handler
(router.broker, router.auth). Importing this package loads the client side only."""

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
    VerdictThresholds,
    WorkerFailed,
    ZeroPoolError,
    verdict,
)

__all__ = [
    "AsyncClient", "BadRequest", "Client", "Embeddings", "InternalError", "NoReply",
    "Overloaded", "Ping", "RequestTimeout", "ShuttingDown", "Similarity", "TooLarge",
    "UnknownVersion", "VerdictThresholds", "WorkerFailed", "ZeroPoolError", "verdict",
]
