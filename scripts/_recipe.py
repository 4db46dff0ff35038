"""Reads a recipe (configs/*.yaml) for the shell launchers, which take their knobs' defaults from it.

    python scripts/_recipe.py defaults CONFIG KNOB=key ...   one line `KNOB<TAB>value` per knob the config sets
    python scripts/_recipe.py without CONFIG OUTPUT key ...  writes CONFIG without the named keys to OUTPUT

Booleans come out as 1/0 (the launchers' knob spelling) and relative paths (train_file, deepspeed) are taken from the
repository root, as the launchers take theirs. Only PyYAML is imported, so a launcher starts without loading torch.
"""

import sys
from pathlib import Path
from typing import IO, NoReturn

try:
    import yaml
except ModuleNotFoundError:
    print(
        f"error: {sys.executable} has no PyYAML; activate the project's virtual environment (bash scripts/test.sh "
        "creates .venv) or pip install -r requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
PATH_KEYS = ("train_file", "validation_file", "test_file", "deepspeed")


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit with status 2, as the launchers do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_recipe(path: Path) -> dict:
    """The mapping a recipe file holds; exits with a one-line error (status 2) when it cannot be read."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        fail(f"cannot read the recipe {path}: {error}")
    if not isinstance(values, dict):
        fail(f"{path}: a recipe must hold a mapping of argument names to values")
    return values


def knob_value(key: str, value: object) -> str:
    """A config value as the launchers spell the knob: 1/0 for booleans, repository-rooted paths."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if key in PATH_KEYS and not Path(str(value)).is_absolute():
        return str(REPO_ROOT / str(value))
    return str(value)


def print_defaults(config: Path, pairs: list[str]) -> None:
    """Print `KNOB<TAB>value` for every KNOB=key pair whose key the recipe sets."""
    values = read_recipe(config)
    for pair in pairs:
        knob, _, key = pair.partition("=")
        if values.get(key) is not None:
            print(f"{knob}\t{knob_value(key, values[key])}")


def write_without(config: Path, output: Path, keys: list[str]) -> None:
    """Write the recipe without `keys` to `output` (atomically: a temporary file renamed into place)."""
    from finetune.atomic_files import write_atomically  # the launchers put the repository on PYTHONPATH

    values = {key: value for key, value in read_recipe(config).items() if key not in keys}
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(file: IO[str]) -> None:
        file.write(f"# {config} without {', '.join(keys)} (written by scripts/_recipe.py)\n")
        yaml.safe_dump(values, file, sort_keys=False, allow_unicode=True)

    write_atomically(output, write)


def main(argv: list[str]) -> None:
    """Run the `defaults` or `without` command."""
    if len(argv) >= 2 and argv[0] == "defaults":
        print_defaults(Path(argv[1]), argv[2:])
    elif len(argv) >= 3 and argv[0] == "without":
        write_without(Path(argv[1]), Path(argv[2]), argv[3:])
    else:
        fail("usage: python scripts/_recipe.py defaults CONFIG KNOB=key ... | without CONFIG OUTPUT key ...")


if __name__ == "__main__":
    main(sys.argv[1:])
