"""`python inference.py --model CHECKPOINT ...`: the same as `chatglm3-chat` (inference/chat_cli.py)."""

import sys

from inference.chat_cli import main

if __name__ == "__main__":
    sys.exit(main())
