"""Requests shaped like Home Assistant's Ollama integration, captured by the recorder.

Home Assistant is not installed here (it is far too heavy); this script rebuilds what its
Ollama conversation agent sends, from reading its source (home-assistant/core:
homeassistant/helpers/llm.py, homeassistant/components/ollama/entity.py and __init__.py,
homeassistant/components/conversation/chat_log.py; late 2025/2026 versions) and a real
tool dump of a 2025.12 install, and sends it with the real `ollama` AsyncClient the way
the integration calls it:

  * at setup, `AsyncClient(host=url, verify=ssl_context).list()` (GET /api/tags);
  * per turn, `client.chat(model=..., messages=[system, user, ...], tools=[...],
    stream=True, keep_alive=-1, options={"num_ctx": 8192}, think=..., format=None)`;
  * one tool per intent (HassTurnOn, HassLightSet, ...), plus GetDateTime,
    todo_get_items, calendar_get_events, one tool per exposed script, GetLiveContext and,
    for a voice satellite, the timer intents and GetCurrentLocation. Parameters are in
    the shape voluptuous_openapi gives (`{"type": "object", "properties": {...},
    "required": [...]}`) and each tool is {"type": "function", "function": {"name",
    "parameters", "description"}} in that order (entity.py's _format_tool);
  * the system prompt: the default instructions, the Assist API prompt (tool-usage
    rules, area and timer lines, the GetLiveContext paragraph) and the exposed entities
    as YAML ("Static Context: ...");
  * after a tool call, the assistant message with `tool_calls` and a `tool` message whose
    content is json of {"data": <intent response>, "error": null}.

Fixtures are made with 30, 60 and 100 tools (the counts come from exposed scripts, which
HA turns into one tool each).

    /work/capture/venv-clients/bin/python tests/replay/homeassistant.py
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import Fixtures, Recorder, Session  # noqa: E402

MODEL = "pichat"
HA_VERSION = "2026.1-style (rebuilt from home-assistant/core source)"

DEFAULT_INSTRUCTIONS_PROMPT = """You are a voice assistant for Home Assistant.
Answer questions about the world truthfully.
Answer in plain text. Keep it simple and to the point.
"""
DEVICE_CONTROL_TOOL_USAGE_PROMPT = (
    "When controlling Home Assistant always call the intent tools. "
    "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
    "When controlling a device, prefer passing just name and domain. "
    "When controlling an area, prefer passing just area name and domain.")
AREA_PROMPT_NO_DEVICE = (
    "When a request names a generic device without an area, "
    "ask the user to specify which area they mean before targeting.")
AREA_PROMPT_DEVICE = (
    "When a request names a generic device without an area, "
    "treat it as the user's current area and call "
    "`GetCurrentLocation` to resolve it before targeting.")
NO_TIMER_PROMPT = "This device is not able to start timers."
DYNAMIC_CONTEXT_PROMPT = (
    "You ARE equipped to answer questions about the current state of\n"
    "the home using the `GetLiveContext` tool. This is a primary function. "
    "Do not state you lack the\n"
    "functionality if the question requires live data.\n"
    'If the user asks about device existence/type (e.g., "Do I have lights in the '
    'bedroom?"): Answer\n'
    "from the static context below.\n"
    'If the user asks about the CURRENT state, value, or mode (e.g., "Is the lock '
    'locked?",\n'
    '"Is the fan on?", "What mode is the thermostat in?", "What is the temperature '
    'outside?"):\n'
    "    1.  Recognize this requires live data.\n"
    "    2.  You MUST call `GetLiveContext`. This tool will provide the needed real-time "
    "information (like temperature from the local weather, lock status, etc.).\n"
    "    3.  Use the tool's response** to answer the user accurately (e.g., \"The "
    "temperature outside is [value from tool].\").\n"
    "For general knowledge questions not about the home: Answer truthfully from internal "
    "knowledge.\n")

S = {"type": "string"}
DEVICE_CLASSES_ON_OFF = ["awning", "blind", "curtain", "damper", "door", "garage", "gate",
                         "shade", "shutter", "window", "identify", "restart", "update",
                         "water", "gas", "tv", "speaker", "receiver", "outlet", "switch"]
MEDIA_CLASSES = ["tv", "speaker", "receiver"]
COVER_CLASSES = ["awning", "blind", "curtain", "damper", "door", "garage", "gate", "shade",
                 "shutter", "window", "water", "gas"]


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or []}


def target(domains: list[str] | None = None, classes: list[str] | None = None) -> dict:
    """name/area/floor/domain/device_class, as DynamicServiceIntentHandler declares."""
    props = {"name": S, "area": S, "floor": S,
             "domain": {"type": "array",
                        "items": {"type": "string", "enum": domains} if domains else S}}
    if classes:
        props["device_class"] = {"type": "array",
                                 "items": {"type": "string", "enum": classes}}
    return props


TIMER_BASE = {"name": S, "area": S}
START_HMS = {"start_hours": {"type": "integer", "minimum": 0},
             "start_minutes": {"type": "integer", "minimum": 0},
             "start_seconds": {"type": "integer", "minimum": 0}}
HMS = {"hours": {"type": "integer", "minimum": 0},
       "minutes": {"type": "integer", "minimum": 0},
       "seconds": {"type": "integer", "minimum": 0}}

# (name, description, parameters); the order intents register in.
INTENTS = [
    ("HassTurnOn", "Turns on/opens/presses a device or entity. For locks, this performs a "
     "'lock' action. Use for requests like 'turn on', 'activate', 'enable', or 'lock'.",
     obj(target(classes=DEVICE_CLASSES_ON_OFF))),
    ("HassTurnOff", "Turns off/closes a device or entity. For locks, this performs an "
     "'unlock' action. Use for requests like 'turn off', 'deactivate', 'disable', or "
     "'unlock'.", obj(target(classes=DEVICE_CLASSES_ON_OFF))),
]
TIMER_INTENTS = [
    ("HassStartTimer", 'Starts a new timer. If user does not specify a timer name, use the '
     'length of the timer as the name (e.g., "1 minute timer").', obj({**HMS, "name": S})),
    ("HassCancelTimer", "Cancels a timer. If the user does not specify which timer, use "
     "their current area.", obj(TIMER_BASE)),
    ("HassIncreaseTimer", "Adds more time to a timer", obj({**TIMER_BASE, **HMS, **START_HMS})),
    ("HassDecreaseTimer", "Removes time from a timer", obj({**TIMER_BASE, **HMS, **START_HMS})),
    ("HassPauseTimer", "Pauses a running timer", obj({**TIMER_BASE, **START_HMS})),
    ("HassUnpauseTimer", "Resumes a paused timer", obj({**TIMER_BASE, **START_HMS})),
    ("HassTimerStatus", "Reports the current status of timers", obj({})),
]
MORE_INTENTS = [
    ("HassCancelAllTimers", "Cancels all timers", obj({"area": S})),
    ("HassBroadcast", "Broadcast a message through the home", obj({"message": S}, ["message"])),
    ("HassClimateSetTemperature", "Sets the target temperature of a climate device or entity",
     obj({"temperature": {"type": "number"}, "area": S, "name": S, "floor": S},
         ["temperature"])),
    ("HassLightSet", "Sets the brightness percentage or color of a light",
     obj({**target(["light"]),
          "color": S,
          "temperature": {"type": "integer", "minimum": 0},
          "brightness": {"type": "integer", "minimum": 0, "maximum": 100,
                         "description": "The brightness percentage of the light between 0 "
                                        "and 100, where 0 is off and 100 is fully lit"}})),
    ("HassMediaUnpause", "Resumes a media player", obj(target(["media_player"], MEDIA_CLASSES))),
    ("HassMediaPause", "Pauses a media player", obj(target(["media_player"], MEDIA_CLASSES))),
    ("HassMediaNext", "Skips a media player to the next item",
     obj(target(["media_player"], MEDIA_CLASSES))),
    ("HassMediaPrevious", "Replays the previous item for a media player",
     obj(target(["media_player"], MEDIA_CLASSES))),
    ("HassSetVolume", "Sets the volume percentage of a media player",
     obj({**target(["media_player"], MEDIA_CLASSES),
          "volume_level": {"type": "integer", "minimum": 0, "maximum": 100,
                           "description": "The volume percentage of the media player"}},
         ["volume_level"])),
    ("HassSetVolumeRelative", "Increases or decreases the volume of a media player",
     obj({"name": S, "area": S, "floor": S,
          "volume_step": {"anyOf": [{"type": "string", "enum": ["up", "down"]},
                                    {"type": "integer", "minimum": -100, "maximum": 100}]}},
         ["volume_step"])),
    ("HassMediaPlayerMute", "Mutes a media player", obj(target(["media_player"], MEDIA_CLASSES))),
    ("HassMediaPlayerUnmute", "Unmutes a media player",
     obj(target(["media_player"], MEDIA_CLASSES))),
    ("HassMediaSearchAndPlay", "Searches for media and plays the first result",
     obj({"search_query": S,
          "media_class": {"type": "string", "enum": [
              "album", "app", "artist", "channel", "composer", "contributing_artist",
              "directory", "episode", "game", "genre", "image", "movie", "music",
              "playlist", "podcast", "season", "track", "tv_show", "url", "video"]},
          "name": S, "area": S, "floor": S}, ["search_query"])),
    ("HassSetPosition", "Sets the position of a device or entity",
     obj({**target(["cover", "valve"], COVER_CLASSES),
          "position": {"type": "integer", "minimum": 0, "maximum": 100}}, ["position"])),
    ("HassStopMoving", "Stops a moving device or entity",
     obj(target(["cover", "valve"], COVER_CLASSES))),
    ("HassFanSetSpeed", "Sets a fan's speed by percentage",
     obj({"name": S, "area": S, "floor": S,
          "percentage": {"type": "integer", "minimum": 0, "maximum": 100}}, ["percentage"])),
    ("HassListAddItem", "Add item to a todo list", obj({"item": S, "name": S}, ["item", "name"])),
    ("HassListCompleteItem", "Complete item on a todo list",
     obj({"item": S, "name": S}, ["item", "name"])),
    ("HassVacuumStart", "Starts a vacuum", obj(target(["vacuum"]))),
    ("HassVacuumReturnToBase", "Returns a vacuum to base", obj(target(["vacuum"]))),
]
GET_DATE_TIME = ("GetDateTime", "Provides the current date and time.", obj({}))
GET_LIVE_CONTEXT = (
    "GetLiveContext",
    "Provides real-time information about the CURRENT state, value, or mode of devices, "
    "sensors, entities, or areas. Use this tool for: 1. Answering questions about current "
    "conditions (e.g., 'Is the light on?'). 2. As the first step in conditional actions "
    "(e.g., 'If the weather is rainy, turn off sprinklers' requires checking the weather "
    "first). You may filter for devices by name, domain, and area, including combining "
    "those filters. Prefer filtering by domain when searching for multiple devices of the "
    "same type.",
    obj({"name": {"type": "string",
                  "description": "Filter entities by name or alias (case-insensitive)."},
         "domain": {"anyOf": [{"type": "string"},
                              {"type": "array", "items": {"type": "string"}}],
                    "description": "Filter entities by domain (e.g. 'light', 'sensor'). "
                                   "Accepts a single domain or a list."},
         "area": {"type": "string",
                  "description": "Filter entities by area name or alias (case-insensitive)."}}))
GET_CURRENT_LOCATION = (
    "GetCurrentLocation",
    "Returns the user's current area, and floor when set. Call this to resolve the area "
    "when a request names a generic device without specifying one.", obj({}))


def todo_tool(lists):
    return ("todo_get_items",
            "Query a to-do list to find out what items are on it. Use this to answer "
            "questions like 'What's on my task list?' or 'Read my grocery list'. Filters "
            "items by status (needs_action, completed, all).",
            obj({"todo_list": {"type": "string", "enum": lists},
                 "status": {"type": "string", "enum": ["needs_action", "completed", "all"],
                            "description": "Filter returned items by status, by default "
                                           "returns incomplete items",
                            "default": "needs_action"}}, ["todo_list"]))


def calendar_tool(calendars):
    return ("calendar_get_events",
            "Get events from a calendar. When asked if something happens, search the whole "
            "week. Results are RFC 5545 which means 'end' is exclusive.",
            obj({"calendar": {"type": "string", "enum": calendars},
                 "range": {"type": "string", "enum": ["today", "week"]}},
                ["calendar", "range"]))


AREAS = ["Living Room", "Kitchen", "Bedroom", "Office", "Hallway", "Bathroom", "Garage",
         "Garden", "Kids Room", "Basement"]
# (domain, name pattern); a house gets these per area until it has enough entities.
PER_AREA = [("light", "{a} Light"), ("switch", "{a} Outlet"), ("sensor", "{a} Temperature"),
            ("climate", "{a} Thermostat"), ("media_player", "{a} Speaker"),
            ("cover", "{a} Blinds"), ("sensor", "{a} Humidity"), ("light", "{a} Lamp"),
            ("binary_sensor", "{a} Motion"), ("fan", "{a} Fan")]
SINGLE = [("lock", "Front Door", "Hallway"), ("vacuum", "Robot Vacuum", None),
          ("todo", "Shopping List", None), ("weather", "Forecast Home", None),
          ("media_player", "Living Room TV", "Living Room"), ("cover", "Garage Door", "Garage")]
SCRIPT_ACTIONS = [
    ("good_morning", "Opens the blinds, turns on the coffee machine and reads the news"),
    ("good_night", "Turns off all lights, locks the front door and arms the alarm"),
    ("movie_time", "Dims the living room lights and turns on the TV"),
    ("leaving_home", "Turns everything off and starts the robot vacuum"),
    ("arriving_home", "Turns on the hallway light and sets the heating to comfort"),
    ("announce", "Announces a message on all speakers"),
    ("water_garden", "Runs the garden irrigation for a number of minutes"),
    ("vacation_mode", "Simulates presence while nobody is home"),
    ("dinner_ready", "Flashes the lights and announces that dinner is ready"),
    ("party_mode", "Colourful lights and music in the living room"),
]
SCRIPT_SCENES = ["reading", "relax", "bright", "night_light", "cleaning", "focus", "cozy"]


def scripts(n: int) -> list[tuple]:
    out = []
    for name, desc in SCRIPT_ACTIONS:
        params = obj({})
        if name == "announce":
            params = obj({"message": {"type": "string",
                                      "description": "The message to announce"}},
                         ["message"])
        elif name == "water_garden":
            params = obj({"minutes": {"type": "number", "minimum": 1, "maximum": 60,
                                      "description": "How long to water"}})
        out.append((name, desc, params))
    for area in AREAS:
        for scene in SCRIPT_SCENES:
            a = area.lower().replace(" ", "_")
            out.append((f"{a}_{scene}",
                        f"Sets the {area.lower()} lights to the {scene.replace('_', ' ')} "
                        "scene", obj({})))
    return out[:n]


def entities(n: int) -> list[dict]:
    """Exposed entities as HA lists them (names, domain, areas), sorted by name."""
    items = [{"names": name, "domain": dom, **({"areas": area} if area else {})}
             for dom, name, area in SINGLE]
    for pattern_dom, pattern in PER_AREA:
        for area in AREAS:
            if len(items) >= n:
                break
            items.append({"names": pattern.format(a=area), "domain": pattern_dom,
                          "areas": area})
    items = items[:n]
    return sorted(items, key=lambda e: e["names"])


def assist(n_tools: int, satellite: bool) -> tuple[list[dict], str]:
    """The tools and the system prompt for a house sized to give n_tools tools."""
    tools = list(INTENTS) + (TIMER_INTENTS if satellite else []) + MORE_INTENTS
    tools.append(GET_DATE_TIME)
    if satellite:
        tools.append(calendar_tool(["Family", "Work"]))
    tools.append(todo_tool(["Shopping List"]))
    tail = [GET_LIVE_CONTEXT] + ([GET_CURRENT_LOCATION] if satellite else [])
    n_scripts = n_tools - len(tools) - len(tail)
    assert n_scripts >= 0, (n_tools, len(tools))
    tools += scripts(n_scripts) + tail
    formatted = [{"type": "function",
                  "function": {"name": name, "parameters": params, "description": desc}}
                 for name, desc, params in tools]
    ents = entities({30: 20, 60: 45, 100: 80}.get(n_tools, 40))
    api_prompt = "\n".join(p for p in [
        DEVICE_CONTROL_TOOL_USAGE_PROMPT,
        AREA_PROMPT_DEVICE if satellite else AREA_PROMPT_NO_DEVICE,
        None if satellite else NO_TIMER_PROMPT,
        DYNAMIC_CONTEXT_PROMPT,
        "Static Context: An overview of the areas and the devices in this smart home:",
        yaml.dump(ents, default_flow_style=False, allow_unicode=True, sort_keys=False),
    ] if p)
    # GetDateTime is among the tools, so chat_log adds no "Current time is ..." line.
    system = "\n".join([DEFAULT_INSTRUCTIONS_PROMPT, api_prompt])
    return formatted, system


def intent_result(name: str, args: dict) -> dict:
    """What IntentTool returns for a successful HassTurnOn (IntentResponseDict)."""
    target = str(args.get("name") or args.get("area") or "device").title()
    return {"speech": {}, "response_type": "action_done",
            "data": {"targets": [], "failed": [],
                     "success": [{"name": target, "type": "entity",
                                  "id": "light." + target.lower().replace(" ", "_")}]}}


async def converse(client, tools: list[dict], system: str, text: str) -> list[dict]:
    """One user turn, looping over tool calls like _async_handle_chat_log does."""
    import ollama

    messages = [ollama.Message(role="system", content=system),
                ollama.Message(role="user", content=text)]
    for _ in range(3):  # HA allows 10; the recorder stops after one tool round
        stream = await client.chat(model=MODEL, messages=list(messages), tools=tools,
                                   stream=True, keep_alive=-1, options={"num_ctx": 8192},
                                   think=False, format=None)
        content, calls = None, []
        async for part in stream:
            msg = part["message"]
            if msg.get("content") is not None:
                content = (content or "") + msg["content"]
            for c in msg.get("tool_calls") or []:
                calls.append((c["function"]["name"],
                              {k: v for k, v in c["function"]["arguments"].items()
                               if v is not None and v != ""}))
        messages.append(ollama.Message(
            role="assistant", content=content,
            tool_calls=[ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(
                name=n, arguments=a)) for n, a in calls] or None))
        if not calls:
            break
        for n, a in calls:
            messages.append(ollama.Message(role="tool", content=json.dumps(
                {"data": intent_result(n, a), "error": None})))
    return messages


CASES = [
    # (case, user text, expect, expect_tool, expect of the turn after a tool result)
    ("turn-on", "Turn on the kitchen light", "tool_call", "HassTurnOn"),
    ("temperature", "What is the temperature in the living room?", "tool_call",
     "GetLiveContext"),
]


def main() -> int:
    import ollama

    fx = Fixtures()
    client_name = f"homeassistant-ollama ({HA_VERSION}; ollama-python {version('ollama')})"
    with Recorder() as rec:
        s = Session(rec, fx, "homeassistant", client_name)
        ctx = ssl.create_default_context()

        async def setup():
            c = ollama.AsyncClient(host=rec.url, verify=ctx)
            await c.list()

        s.case("setup-list", lambda: asyncio.run(setup()), "list")
        for n_tools in (30, 60, 100):
            satellite = n_tools > 30
            tools, system = assist(n_tools, satellite)
            assert len(tools) == n_tools
            for case, text, expect, tool in CASES:
                mark = rec.mark()

                async def run(text=text, tools=tools, system=system):
                    c = ollama.AsyncClient(host=rec.url, verify=ctx)
                    return await converse(c, tools, system, text)

                try:
                    asyncio.run(run())
                except Exception as e:
                    print(f"  ! {case}: {type(e).__name__}: {e}", file=sys.stderr)
                for i, e in enumerate(rec.since(mark), 1):
                    last = (e["body"].get("messages") or [{}])[-1]
                    after_tool = last.get("role") == "tool"
                    exp = "text" if after_tool else expect
                    p = fx.write("homeassistant", client_name, f"{n_tools}tools-{case}", i, e,
                                 exp, None if after_tool else tool,
                                 satellite=satellite)
                    print(f"  {p.name}: {e['body_bytes']} B, {len(e['body']['tools'])} tools,"
                          f" expect {exp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
