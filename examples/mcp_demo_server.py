#!/usr/bin/env python3
"""A small MCP server for trying tools out: a museum's hours, timers, lights, weather.

Run by the assistant over stdio (``tools.mcp: [{command: [python,
examples/mcp_demo_server.py]}]``, as examples/kiosk-tools.yaml does), or
over streamable HTTP::

    python examples/mcp_demo_server.py --http 8765     # http://127.0.0.1:8765/mcp

Its answers are made up and fixed (no network): the weather of any city is
the same table every day. It is the test suite's MCP server too.
"""

from __future__ import annotations

import argparse
import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("assistant-demo", log_level="WARNING")

HOURS = {"monday": "closed", "tuesday": "10 am to 6 pm", "wednesday": "10 am to 6 pm", "thursday": "10 am to 9 pm",
         "friday": "10 am to 6 pm", "saturday": "9 am to 7 pm", "sunday": "9 am to 5 pm"}
WEATHER = ["sunny, 18 degrees", "cloudy, 12 degrees", "light rain, 9 degrees", "clear, 22 degrees"]


@server.tool()
def opening_hours(day: str) -> str:
    """The museum's opening hours on a day of the week."""
    hours = HOURS.get(day.strip().lower())
    if hours is None:
        raise ToolError(f"{day!r} is not a day of the week")
    return f"The museum is {hours} on {day.strip().capitalize()}." if hours == "closed" else (
        f"On {day.strip().capitalize()} the museum is open {hours}.")


@server.tool()
def get_weather(city: str) -> str:
    """The current weather in a city."""
    if os.environ.get("DEMO_SLOW_WEATHER"):  # for trying the acknowledgement of a slow call
        time.sleep(float(os.environ["DEMO_SLOW_WEATHER"]))
    return f"In {city.strip()} it is {WEATHER[sum(map(ord, city.strip().lower())) % len(WEATHER)]}."


@server.tool()
def set_timer(minutes: int) -> str:
    """Start a countdown timer of a number of minutes."""
    if not 0 < minutes <= 24 * 60:
        raise ToolError("a timer runs from 1 minute to 24 hours")
    return f"A timer for {minutes} minutes is running."


@server.tool()
def switch_lights(room: str, on: bool = True) -> str:
    """Switch the lights of a room on or off."""
    return f"The {room.strip()} lights are {'on' if on else 'off'}."


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT/mcp")
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()
