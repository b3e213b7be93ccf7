"""Tool use (function calling): the tool schemas, a chat template that renders them, the tools' Python side
and the parser that reads a model's call. Requests, traces and the executor loop: skillbook.ml.tool_traces.

A trace is user request -> assistant tool call -> tool result -> assistant answer, as the chat messages
`tokenizer.apply_chat_template(messages, tools=TOOLS)` takes (OpenAI's format, `arguments` a dict as
transformers' templates expect). Two tools: `calculator(a, op, b)` (integers, + or -) and
`lookup(name, fact)` over the synthetic world's facts. Requests are deterministic by seed; held-out
calculations never occur in training, held-out lookups are the world's eval facts (stated in the
pretraining corpus, asked in no training row).

Copying is what a tiny model finds hard, so the format makes every copy an identity: the template writes
JSON with a space after `:` and `,` so a number in the call is the same byte-level token as in the
question (` 18`, not `1`, `8` after a quote), and a tool result and the answer both follow a marker or a
newline, so they tokenize alike too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from skillbook.ml.synthetic_world import Fact, World

# ---------------------------------------------------------------------------------------------
# The tools: JSON schemas in the OpenAI / transformers `tools=[...]` format, and their Python side
# ---------------------------------------------------------------------------------------------

# The world's attributes as the lookup tool's `fact` argument names them; pet facts are looked up by the pet's name.
ATTRIBUTES = dict(town="town", food="food", job="job", age="age", object_colour="object_colour")
ATTRIBUTES.update(pet_name="pet", pet_species="species", pet_colour="colour", owner="owner")
PET_ATTRIBUTES = ("pet_species", "pet_colour", "owner")


def _tool(name: str, description: str, properties: dict[str, dict]) -> dict:
    """One tool in the OpenAI / transformers `tools=[...]` format (a JSON schema of its arguments)."""
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS: list[dict] = [
    _tool(
        "calculator",
        "Add or subtract two integers: a op b.",
        {
            "a": {"type": "integer", "description": "The first operand."},
            "op": {"type": "string", "enum": ["+", "-"]},
            "b": {"type": "integer", "description": "The second operand."},
        },
    ),
    _tool(
        "lookup",
        "Look up one fact about a person or a pet of the village.",
        {
            "name": {"type": "string", "description": "A person's or a pet's name."},
            "fact": {"type": "string", "enum": list(ATTRIBUTES.values())},
        },
    ),
]

# Tool-call markers, as Qwen2.5 / Hermes write them. Each is one added (not special) token, so it costs one
# position and survives decode(skip_special_tokens=True); the recipe adds them when a tokenizer lacks them.
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Plain Jinja (no `{% generation %}`: llama.cpp's jinja renders it too) extending Skillbook's role format
# (tokenizer_utils.CHAT_TEMPLATE) the Hermes / Qwen2.5 way: tool signatures in a system turn, a call as
# `<tool_call>{json}</tool_call>`, the result as `<tool_response>...</tool_response>` right after it.
# Signatures, not schemas: the tiny model has a 128-token context. The call's JSON is written with `: ` and
# `, ` (json.dumps' default) so a number keeps its leading space, hence its token. It is built key by key
# because plain Jinja2's tojson (llama-cpp-python) sorts keys and returns Markup that escapes quotes it is
# concatenated with. See skills/tool-use/references/chat-templates.md.
TOOL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- endif -%}"
    "{%- if tools or ns.system -%}"
    "{{- '<|system|>\n' -}}{%- if ns.system -%}{{- ns.system + '\n' -}}{%- endif -%}"
    "{%- if tools -%}{{- 'tools:' -}}"
    "{%- for tool in tools -%}{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
    "{{- ' ' + f['name'] + '(' + (f['parameters']['properties'] | list | join(', ')) + ')' -}}"
    "{%- endfor -%}{{- '\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('a system message must come first') }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>\n' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'tool' -%}{{- '<tool_response>' + message['content'] + '</tool_response>\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>\n' -}}"
    "{%- if message['content'] -%}{{- message['content'] -}}{%- endif -%}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{{- '<tool_call>{\"name\": \"' + f['name'] + '\", \"arguments\": ' -}}"
    "{%- if f['arguments'] is string -%}{{- f['arguments'] -}}{%- else -%}{{- '{' -}}"
    "{%- for key, value in f['arguments'].items() -%}"
    "{{- (', ' if not loop.first else '') + '\"' + key + '\": ' -}}{{- value | tojson -}}"
    "{%- endfor -%}{{- '}' -}}{%- endif -%}{{- '}</tool_call>' -}}"
    "{%- endfor -%}{{- eos_token -}}"
    "{%- else -%}{{ raise_exception('chat roles are system, user, assistant and tool; got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def response_template(eos_token: str) -> dict:
    """transformers' declarative `tokenizer.response_template` for TOOL_CHAT_TEMPLATE's assistant turns:
    `tok.parse_response(...)` (and `transformers serve`, which reads it) turn a generation into
    {"role", "content", "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}."""
    return {
        "defaults": {"role": "assistant"},
        "start_anchor": "<|assistant|>\n",
        "fields": {
            "tool_calls": {
                "open_pattern": r"\s*<tool_call>",
                "close": "</tool_call>",
                "repeats": True,
                "content": "json",
                "transform": {"type": "function", "function": "{content}"},
            },
            "content": {"close_pattern": r"\s*" + re.escape(eos_token), "content": "text"},
        },
    }


def add_tool_tokens(tok: Any) -> list[str]:
    """Add the TOOL_TOKENS a tokenizer lacks (as normal added tokens, like Qwen2.5's); returns those added."""
    missing = [t for t in TOOL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
    return missing


def calculate(a: Any, op: Any, b: Any) -> int:
    """a + b or a - b for integers (not bools, not strings); ValueError on anything else."""
    if type(a) is not int or type(b) is not int or op not in ("+", "-"):
        raise ValueError(f"calculator takes integers a, b and op '+' or '-'; got {a!r} {op!r} {b!r}")
    return a + b if op == "+" else a - b


def lookup_args(fact: Fact) -> dict:
    """The lookup arguments that answer `fact` (pet facts by the pet's name)."""
    slots = dict(fact.slots)
    return {"name": slots["q" if fact.attribute in PET_ATTRIBUTES else "p"], "fact": ATTRIBUTES[fact.attribute]}


def fact_table(world: World) -> dict[tuple[str, str], str]:
    """(name, attribute) -> answer for every fact of the world, as the lookup tool sees it."""
    return {tuple(lookup_args(f).values()): f.answer for f in world.facts if f.kind == "fact"}


def execute(call: dict, facts: dict[tuple[str, str], str]) -> str:
    """Run one parsed call {"name", "arguments"}; errors come back as text, as a real executor returns them."""
    args = call.get("arguments") or {}
    try:
        if call.get("name") == "calculator":
            return str(calculate(args["a"], args["op"], args["b"]))
        if call.get("name") == "lookup":
            return facts.get((str(args["name"]), str(args["fact"])), "unknown")
    except (KeyError, ValueError, TypeError) as err:
        return f"error: {err}"
    return f"error: unknown tool {call.get('name')!r}"


# ---------------------------------------------------------------------------------------------
# Parsing and the executor loop
# ---------------------------------------------------------------------------------------------

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_call(text: str) -> dict | None:
    """The first call in a generation: `<tool_call>{json}</tool_call>` (Hermes / Qwen) or a bare JSON object
    (Llama 3.1), normalised to {"name", "arguments"} (`parameters` accepted, string arguments decoded)."""
    m = _CALL.search(text)
    body = m.group(1) if m else text.strip()
    if not body.startswith("{"):
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def valid_call(call: dict | None, tools: list[dict] = TOOLS) -> bool:
    """A known tool with exactly its parameter names."""
    if call is None:
        return False
    for tool in tools:
        fn = tool.get("function", tool)
        if fn["name"] == call["name"]:
            return set(call["arguments"]) == set(fn["parameters"]["properties"])
    return False


def same_arguments(call: dict | None, expected: dict) -> bool:
    """The reference call's tool and exactly its arguments (values compared as JSON: 18 is not "18")."""
    return call is not None and call["name"] == expected["name"] and call["arguments"] == expected["arguments"]


def parse_turn(tok: Any, text: str, prompt: str) -> tuple[dict | None, str]:
    """(first call or None, text content) of a generated assistant turn: `tok.parse_response` when the
    tokenizer has a response_template (transformers' own parser; a malformed call is no call), else
    parse_call (e.g. a hub Qwen2.5 tokenizer, whose template writes the same `<tool_call>` form)."""
    if getattr(tok, "response_template", None) is None:
        return parse_call(text), ("" if "<tool_call>" in text or text.lstrip().startswith("{") else text)
    try:
        msg = tok.parse_response(text, prefix=prompt, tools=TOOLS)
    except ValueError:  # the template's json parser: not valid JSON between the markers
        return None, ""
    calls = [c.get("function", c) if isinstance(c, dict) else c for c in msg.get("tool_calls") or []]
    call = calls[0] if calls else None  # the JSON between the markers may be anything: a number, a list
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
        call = None
    return ({"name": call["name"], "arguments": call["arguments"]} if call else None), msg.get("content") or ""
