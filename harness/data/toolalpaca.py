"""ToolAlpaca (Tang et al., 2023): answer a user request with a sequence of API function calls.

Source: local only (no hub dataset exists): ``<data_dir>/toolalpaca/eval_simulated.json`` (10 simulated
APIs) and ``eval_real.json`` (11 real APIs), from the repository tangqiaoyu/ToolAlpaca. Its ~4k-instance
training set is not used: the offline study must train and evaluate from these two files.

Splits (our choice, documented because the paper trains on the separate training set): the simulated
APIs are split BY API, so evaluation measures calling unseen APIs as the paper's evaluation does. The APIs
are ranked by a hash of their name; the first 3 are ``test``, the next 1 ``validation``, the other 6
``train``. Every real API is additional ``test`` (``metadata["api_set"] == "real"``).

Prompt: the API's name and description, a compact documentation (each function's description and
parameters from ``Function_Description``; output schemas dropped, and parameter descriptions shortened
when the whole exceeds ``MAX_DOC_CHARS`` so that prompts stay a few hundred tokens), then the request and
the answer format ``Action: <name>`` / ``Action Input: <json>`` (plus ToolAlpaca's ``getDetails``
pseudo-function for asking the user, which 8 golden answers use). The demonstration is the golden steps in
that format; ``answer`` is a JSON list of ``{"action", "arguments"}``. 36 golden inputs are not valid
JSON (placeholders such as ``${animeId from searchAnime}``, a few typos): their ``arguments`` is the raw
string and ``metadata["golden_parsed"]`` is False.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.data.errors import DataNotFoundError
from harness.data.prompts import tool_steps, user_messages
from harness.data.records import Example
from harness.data.sources import ENV_VAR, local_file, read_json, stable_hash

NAME = "toolalpaca"
KIND = "tool_call"
SPLITS = ("train", "validation", "test")
HUB_ID = None
HUB_CONFIG = None
PROMPT_VERSION = 1
SIZES = {"train": 3938, "test": 114}  # approximate split sizes (hub versions), for the plan's estimates

MAX_DOC_CHARS = 1500
N_TEST_APIS = 3
N_VALIDATION_APIS = 1
_FILES = ("eval_simulated.json", "eval_real.json")


def _parameters_text(parameters: str, max_desc: int) -> str:
    """Shorten each parameter's description to ``max_desc`` characters (0: names and types only)."""
    try:
        params = json.loads(parameters)
    except json.JSONDecodeError:
        return parameters[: max(max_desc, 40) * 4]
    if not isinstance(params, dict):
        return parameters
    short = {}
    for key, desc in params.items():
        desc = str(desc)
        if max_desc == 0:  # keep "Required. string." style prefixes: the type is what a call needs
            desc = (
                ". ".join(desc.split(". ")[:2])
                if desc.startswith(("Required", "Optional"))
                else desc.split(". ")[0]
            )
        elif len(desc) > max_desc:
            desc = desc[: max_desc - 3].rstrip() + "..."
        short[key] = desc
    return json.dumps(short, ensure_ascii=False)


def api_documentation(api: dict, max_chars: int = MAX_DOC_CHARS) -> str:
    """Each function as ``name: description`` + ``Parameters: {...}``, shortened to fit ``max_chars``."""
    functions = {k: v for k, v in api["Function_Description"].items() if k != "components"}
    for max_desc in (None, 120, 60, 0):
        lines = []
        for name, text in functions.items():
            body = text.split("\nOutput:")[0].strip()
            description, _, parameters = body.partition("\nParameters:")
            if max_desc is not None:
                description = description.split("\n")[0][:200]
                parameters = (
                    " " + _parameters_text(parameters.strip(), max_desc) if parameters.strip() else ""
                )
            lines.append(
                f"{name}: {description.strip()}" + (f"\nParameters:{parameters}" if parameters else "")
            )
        doc = "\n".join(lines)
        if len(doc) <= max_chars:
            return doc
    return doc[:max_chars].rstrip() + "\n(documentation truncated)"


def _prompt(api: dict, instruction: str) -> str:
    return (
        f'You can call the functions of the API "{api["Name"]}": {api["Description"].strip()}\n'
        f"{api_documentation(api)}\n"
        "Answer the request by calling functions. For each call, in order, write two lines:\n"
        "Action: <function name>\nAction Input: <arguments as a JSON object>\n"
        'If the request lacks a value a call needs, first call getDetails with {"Question": "<what to ask>"}.\n'
        f"Request: {instruction.strip()}"
    )


def _examples(api: dict, api_set: str) -> list[Example]:
    examples = []
    for i, (instruction, golden) in enumerate(zip(api["Instructions"], api["Golden_Answers"], strict=True)):
        steps, answer, parsed_all = [], [], True
        for step in golden:
            raw = step["Action_Input"].strip()
            try:
                arguments = json.loads(raw)
                steps.append((step["Action"], json.dumps(arguments, ensure_ascii=False)))
            except json.JSONDecodeError:
                arguments, parsed_all = raw, False
                steps.append((step["Action"], raw))
            answer.append({"action": step["Action"], "arguments": arguments})
        examples.append(
            Example(
                id=f"{NAME}/{api_set}/{api['Name']}/{i}",
                benchmark=NAME,
                kind=KIND,
                messages=user_messages(_prompt(api, instruction)),
                demonstration=tool_steps(steps),
                answer=json.dumps(answer, ensure_ascii=False),
                metadata={
                    "api": api["Name"],
                    "api_set": api_set,
                    "category": api.get("Category", ""),
                    "golden_parsed": parsed_all,
                    "prompt_version": PROMPT_VERSION,
                },
            )
        )
    return examples


def api_split(names: list[str]) -> dict[str, str]:
    """Simulated API name -> split, by a hash of the name (independent of file order)."""
    ranked = sorted(names, key=lambda n: stable_hash(f"toolalpaca-api:{n}"))
    split = {}
    for rank, name in enumerate(ranked):
        split[name] = (
            "test"
            if rank < N_TEST_APIS
            else "validation"
            if rank < N_TEST_APIS + N_VALIDATION_APIS
            else "train"
        )
    return split


def load_local(folder: Path, split: str) -> list[Example]:
    simulated = read_json(local_file(folder, NAME, _FILES[0], hub=None))
    split_of = api_split([api["Name"] for api in simulated])
    examples = [
        ex for api in simulated if split_of[api["Name"]] == split for ex in _examples(api, "simulated")
    ]
    if split == "test":
        for api in read_json(local_file(folder, NAME, _FILES[1], hub=None)):
            examples.extend(_examples(api, "real"))
    return examples


def load_hub(split: str) -> list[Example]:
    raise DataNotFoundError(
        f"toolalpaca has no Hugging Face hub dataset: set spec data.data_dir or {ENV_VAR} to a folder "
        f"holding toolalpaca/{_FILES[0]} and toolalpaca/{_FILES[1]} (from github.com/tangqiaoyu/ToolAlpaca, data/)."
    )
