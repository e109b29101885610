"""What PLC/MES integrators use (torch-free): the wire format, CURVE keys, the Python clients and `linewatch watch`.

`from linewatch.protocol import Subscriber, TriggerClient` is the documented entry point for client code.
"""

from linewatch.protocol.client import Subscriber, TriggerClient, TriggerError, TriggerTimeout
from linewatch.protocol.wire import Message, ProtocolError

__all__ = ["Message", "ProtocolError", "Subscriber", "TriggerClient", "TriggerError", "TriggerTimeout"]
