"""`python inference.py --model CHECKPOINT ...` from the repository root: the same as inference/inference.py."""

import sys

from inference.inference import main

if __name__ == "__main__":
    sys.exit(main())
