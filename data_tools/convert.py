"""`chatglm3-convert FORMAT ARGS...`: one command for every converter, chosen by the name of its source format.

    chatglm3-convert advertise_gen --train_file AdvertiseGen/train.json --dev_file AdvertiseGen/dev.json
    chatglm3-convert openai --input chats.jsonl --output formatted_data/openai.jsonl
    chatglm3-convert FORMAT --help            # that converter's own flags

Each converter stays a runnable file as well (`python data_tools/format_FORMAT.py ...`); this registry only maps a
format name to the module whose `main(argv)` converts it. A new converter is one module plus one line here.
"""

import importlib
import sys

CONVERTERS = {
    "advertise_gen": "data_tools.format_advertise_gen",
    "tool_alpaca": "data_tools.format_tool_alpaca",
    "openai": "data_tools.format_openai",
    "glm4": "data_tools.format_glm4",
    "sharegpt": "data_tools.format_sharegpt",
    "preference": "data_tools.format_preference",
}


def usage() -> str:
    """The command's usage text, listing the registered formats."""
    formats = "\n".join(f"  {name:<15} {module.replace('.', '/')}.py" for name, module in CONVERTERS.items())
    return f"usage: chatglm3-convert FORMAT [converter flags ...]\n\nformats:\n{formats}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the converter registered for the format named first; return its exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in CONVERTERS:
        print(f"error: unknown format {name!r}; choose one of {', '.join(CONVERTERS)}", file=sys.stderr)
        return 2
    converter = importlib.import_module(CONVERTERS[name])
    return converter.main(rest)


if __name__ == "__main__":
    sys.exit(main())
