"""The network face of the assistant: the websocket server, its wire protocol, and a client."""
