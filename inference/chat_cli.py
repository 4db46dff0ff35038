"""Chat with, or batch-generate from, any checkpoint: P-Tuning v2, LoRA, full fine-tune or base model.

    python inference.py --model output/checkpoint-1000                 # interactive chat (or: chatglm3-chat ...)
    python inference.py --model CKPT --prompt "..."                     # one reply
    python inference.py --model CKPT --input_file in.jsonl --output_file out.jsonl

Interactive chat streams the reply; Ctrl-C stops a reply and returns to the prompt (the stopped turn is not
kept); `/clear` forgets the history, `exit`, `quit`, `/exit` or `/quit` (or end of input, or Ctrl-C at the prompt)
quits. `python inference.py` at the repository root and the `chatglm3-chat` command run this module.
Batch mode reads input-output records ({"prompt"}: encoded as in training, `[gMASK] sop` + prompt) or
conversation records ({"conversations"}: ChatGLM3 chat turns, the reply follows them) and writes one
{"prompt" or "conversations", "response"} line per record. A record with "tools" keeps them, and a reply that calls
one of them is written as the chat API returns it: "response": null and
"tool_calls": [{"type": "function", "function": {"name", "arguments" (a JSON string)}}].
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

from finetune.checkpoints import ModelLoadError, add_loading_arguments, load_from_arguments
from finetune.data.formats import format_of, prompt_example
from finetune.data.records import DataValidationError
from finetune.evaluate import DEFAULT_MAX_SOURCE_LENGTH, read_checked_records
from finetune.generation import build_generation_config, decode_reply, generate_token_ids
from finetune.model.checkpoint_files import CheckpointError
from finetune.prediction_log import (
    OutputNotWritableError,
    PartialWriter,
    check_writable,
    merge_predictions,
    partial_path,
    prepare_resume,
    read_partial_rows,
)
from inference.openai_protocol import assistant_reply  # noqa: E402

CLEAR_COMMAND = "/clear"
EXIT_COMMANDS = ("exit", "quit", "/exit", "/quit")
REPLY_STOPPED = "[reply stopped]"


def chat_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for model.chat/stream_chat from the command line."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "max_length": None, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(temperature=None, top_p=None)
    return kwargs


def reply_text(reply: str | dict) -> str:
    """A chat reply as text: plain text as is, a tool call as JSON."""
    return reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)


def stream_reply(
    model, tokenizer, query: str, history: list[dict], generation_kwargs: dict, stoppable: bool = False
) -> list[dict]:
    """Print the reply to `query` as it is generated; return the history with this turn added.

    With `stoppable`, Ctrl-C stops the reply (generation ends, the turn is left out of the history) instead of
    propagating KeyboardInterrupt.
    """
    printed = ""
    text = ""
    turn_history = history
    replies = model.stream_chat(tokenizer, query, history=history, **generation_kwargs)
    try:
        with contextlib.closing(replies):
            for reply, updated_history in replies:
                text = reply_text(reply)
                turn_history = updated_history
                if text.startswith(printed):
                    print(text[len(printed) :], end="", flush=True)
                    printed = text
    except KeyboardInterrupt:
        if not stoppable:
            raise
        print(f"\n{REPLY_STOPPED}", flush=True)
        return history
    if text != printed:
        # The final reply no longer extends what was streamed (e.g. it turned out to be a tool call): show it whole.
        print(f"\n{text}", end="")
    print(flush=True)
    return turn_history


def chat_loop(model, tokenizer, generation_kwargs: dict) -> None:
    """Interactive multi-turn chat on stdin/stdout until /exit or end of input."""
    print(f"Chat with the model. {CLEAR_COMMAND} clears the history, exit or quit ends the chat.", flush=True)
    history: list[dict] = []
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        if not query:
            continue
        if query.lower() in EXIT_COMMANDS:
            return
        if query == CLEAR_COMMAND:
            history = []
            print("History cleared.", flush=True)
            continue
        print("ChatGLM: ", end="", flush=True)
        history = stream_reply(model, tokenizer, query, history, generation_kwargs, stoppable=True)


def check_batch_files(args: argparse.Namespace) -> list[dict]:
    """Check --input_file's records and that --output_file's folder can be written, before any model is loaded."""
    records = read_checked_records(args.input_file, reference_from_record=False)
    check_writable(Path(args.output_file).resolve().parent, "--output_file")
    return records


def batch_settings(args: argparse.Namespace) -> dict:
    """What decides the replies: a rerun with the same settings continues an interrupted batch run."""
    keys = ("base", "max_new_tokens", "do_sample", "temperature", "top_p", "max_source_length", "merge_lora")
    settings = {key: getattr(args, key) for key in keys}
    settings.update(model=str(Path(args.model).resolve()), input_file=str(Path(args.input_file).resolve()))
    return settings


def batch_row(record: dict, prompt: str | list[dict], ids: list[int], tokenizer, has_metadata: bool) -> dict:
    """The output line of one record: its prompt or conversations, its tools, and the reply or tool call."""
    prompt_key = format_of(record).prompt_key
    tools = record.get("tools") if has_metadata else None
    if not tools:
        return {prompt_key: prompt, "response": decode_reply(ids, tokenizer, has_metadata)}
    content, calls = assistant_reply(decode_reply(ids, tokenizer, False), tools)
    row = {prompt_key: prompt, "tools": tools, "response": content}
    if calls:
        row["tool_calls"] = [{"type": call["type"], "function": call["function"]} for call in calls]
    return row


def run_batch(model, tokenizer, args: argparse.Namespace, records: list[dict]) -> int:
    """Generate a reply for every checked record and write them to --output_file; return the count.

    Replies are appended to a partial file as they are made; a rerun with the same settings continues from it, and
    the finished run writes --output_file (one line per record, in input order) atomically.
    """
    examples = [prompt_example(record, tokenizer, args.max_source_length, False) for record in records]
    final = Path(args.output_file)
    prepare_resume(final, batch_settings(args))
    done = read_partial_rows(final)
    pending = [index for index in range(len(examples)) if str(index) not in done]
    generation_config = build_generation_config(
        tokenizer, args.max_new_tokens, args.do_sample, args.temperature, args.top_p
    )

    def write_batch(batch: list[int], new_ids: list[list[int]]) -> None:
        rows = []
        for position, ids in zip(batch, new_ids, strict=True):
            index = pending[position]
            example = examples[index]
            row = batch_row(records[index], example.prompt, ids, tokenizer, example.reply_has_metadata)
            rows.append({"id": str(index), **row})
        writer.write(rows)

    writer = PartialWriter(partial_path(final, 0))
    try:
        prompts = [examples[index].prompt_ids for index in pending]
        generate_token_ids(
            model, tokenizer, prompts, generation_config, args.batch_size, show_progress=True, on_batch=write_batch
        )
    finally:
        writer.close()
    merge_predictions(final, [str(index) for index in range(len(examples))], keep_id=False)
    return len(examples)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of inference."""
    parser = argparse.ArgumentParser(description="Chat with or generate from a ChatGLM3 checkpoint of any kind.")
    add_loading_arguments(parser)
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--input_file", help="batch mode: .jsonl/.json of prompt or conversation records")
    parser.add_argument("--output_file", help="batch mode: where to write the replies (JSONL)")
    parser.add_argument("--merge_lora", action="store_true", help="merge a LoRA adapter into the base for speed")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8, help="with --do_sample")
    parser.add_argument("--top_p", type=float, default=0.8, help="with --do_sample")
    parser.add_argument("--batch_size", type=int, default=8, help="batch mode: prompts generated together")
    parser.add_argument("--max_source_length", type=int, default=DEFAULT_MAX_SOURCE_LENGTH, help="batch mode")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message on a checkpoint or input problem)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.input_file) != bool(args.output_file):
        parser.error("--input_file and --output_file go together")
    if args.prompt is not None and args.input_file:
        parser.error("use either --prompt or --input_file, not both")
    for name in ("max_new_tokens", "batch_size", "max_source_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive number, got {getattr(args, name)}")
    try:
        records = check_batch_files(args) if args.input_file else None
        model, tokenizer, _ = load_from_arguments(args, merge_lora=args.merge_lora)
        if args.input_file:
            count = run_batch(model, tokenizer, args, records)
            print(f"wrote {count} replies to {args.output_file}", file=sys.stderr)
        elif args.prompt is not None:
            stream_reply(model, tokenizer, args.prompt, [], chat_options(args))
        else:
            chat_loop(model, tokenizer, chat_options(args))
    except (CheckpointError, ModelLoadError, DataValidationError, OutputNotWritableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
