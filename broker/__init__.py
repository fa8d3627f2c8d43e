"""CALM's broker layer: Redis connections, wire formats, consumer groups and the knowledge base.

It knows nothing about models or routing.
"""

from broker.config import Settings, load_settings
from broker.connection import ResolvedRedis, client, resolve
from broker.consumer import ConsumerSpec, StreamConsumer, ensure_group
from broker.effects import Effects, Entry
from broker.errors import BrokerError, ConfigError, DecodeError, ValidationError
from broker.kb import KnowledgeBase, ModelState, WorkerState
from broker.names import Names

__all__ = [
    "BrokerError", "ConfigError", "ConsumerSpec", "DecodeError", "Effects", "Entry", "KnowledgeBase",
    "ModelState", "Names", "ResolvedRedis", "Settings", "StreamConsumer", "ValidationError", "WorkerState",
    "client", "ensure_group", "load_settings", "resolve",
]
