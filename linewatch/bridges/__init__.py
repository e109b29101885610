"""Gateways from the ZeroMQ protocol to what PLCs and plant systems speak (OPC UA, MQTT): separate processes that
subscribe like any client, so they can never slow the daemon. Need `linewatch[opcua]` / `linewatch[mqtt]`."""
