"""Carry an official folder's remote-code files (the modules its `auto_map` names) into folders saved from it.

An official chatglm3-6b folder names its classes in `auto_map` (config.json, tokenizer_config.json) and holds their
modules (configuration_chatglm.py, modeling_chatglm.py, tokenization_chatglm.py and what they import). A folder we
save or export from it keeps `auto_map`; copying those files too lets it load with the official stack
(with trust_remote_code on) and with tools that expect them. We never write their content ourselves.
"""

import logging
import shutil
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from finetune.atomic_files import atomic_path

from .checkpoint_files import read_json_file

AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")

logger = logging.getLogger(__name__)


def auto_map_modules(folder: Path) -> set[str]:
    """Module names ("modeling_chatglm", ...) that the auto_map of the folder's configs points to in the folder."""
    modules: set[str] = set()
    for name in AUTO_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        for reference in (read_json_file(path).get("auto_map") or {}).values():
            for class_reference in reference if isinstance(reference, list) else [reference]:
                # "owner/repo--module.Class" points to another repository, not to a file of this folder.
                if class_reference and "--" not in class_reference:
                    modules.add(class_reference.rsplit(".", 1)[0])
    return modules


def remote_code_files(folder: str | Path) -> list[Path]:
    """The remote-code files of `folder`: the auto_map modules that exist there and the modules they import."""
    folder = Path(folder)
    files: set[Path] = set()
    for module in auto_map_modules(folder):
        module_file = folder / f"{module}.py"
        if module_file.is_file():
            files.add(module_file)
            files.update(Path(path) for path in get_relative_import_files(module_file))
    return sorted(files)


def copy_remote_code_files(base: str | Path, target: str | Path, shown_as: str | Path | None = None) -> list[str]:
    """Copy the remote-code files of the `base` folder into `target` (each atomically); return their names.

    When `target`'s auto_map names modules that neither folder has, warn (naming the folder `shown_as`, default
    `target`): it then fails to load with the official code until the official model folder's .py files are copied.
    """
    target = Path(target)
    copied = []
    for source in remote_code_files(base):
        with atomic_path(target / source.name) as temp_name:
            shutil.copyfile(source, temp_name)
        copied.append(source.name)
    missing = sorted(f"{module}.py" for module in auto_map_modules(target) if not (target / f"{module}.py").is_file())
    if missing:
        logger.warning(
            "%s: auto_map names %s, but the base folder %s does not have these files, so they were not copied; to "
            "load this folder with the official remote code (vLLM --trust-remote-code, FastChat), copy the .py "
            "files of the official chatglm3-6b model folder into it (this project does not ship them)",
            shown_as or target,
            ", ".join(missing),
            base,
        )
    return copied
