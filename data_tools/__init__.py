"""Converters from public datasets (AdvertiseGen, ToolAlpaca) and tool-data formats (OpenAI, GLM-4, ShareGPT) and
preference data to the toolkit's JSONL training formats: one thin script each (format_*.py, also run through
`chatglm3-convert`, convert.py), over the small library they share (conversion.py, tool_conversations.py).
"""
