"""Script the launchers call: `python finetune/finetune.py ARGS` or `torchrun ... finetune/finetune.py ARGS`.

Run as a file, Python puts this script's own folder first on sys.path, where `finetune.py` itself would shadow the
`finetune` package; the folder is replaced by the repository root before the package is imported.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    SCRIPT_DIR = Path(__file__).resolve().parent
    sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != SCRIPT_DIR]
    sys.path.insert(0, str(SCRIPT_DIR.parent))
    from finetune.train import cli

    cli()
