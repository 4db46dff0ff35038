"""Test dependencies fetched with pip on first use and kept in a cache folder outside the repository.

- `old_stack_folder()`: transformers 4.40.2 / tokenizers 0.19.1 / huggingface_hub 0.23.4 / peft 0.11.1 installed with
  `pip install --no-deps --target`, for running THUDM's official remote code (tests/e2e/test_use_elsewhere.py).
- `transformers_common_tests()`: transformers' common model tests (`tests/test_modeling_common.py`) from the sdist
  of the installed transformers version (tests/unit/finetune/model/test_transformers_common.py).

The cache is $CHATGLM_TEST_CACHE, else ~/.cache/chatglm3-finetune-tests. Outside CI a test that cannot fetch them
skips with the reason; under CI (CI=true) it fails, because CI must run these comparisons.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import transformers

OLD_STACK = (
    "transformers==4.40.2",
    "tokenizers==0.19.1",
    "huggingface_hub==0.23.4",
    "peft==0.11.1",
    # huggingface_hub 0.23 needs requests, which the project's own stack no longer pulls in.
    "requests==2.32.3",
    "charset_normalizer==3.3.2",
    "idna==3.7",
    "urllib3==2.2.2",
    "certifi==2024.7.4",
)
# Modules test_modeling_common.py imports that transformers' sdist does not ship: the mixins they hold add tests we
# cannot run, so they are replaced by empty mixins (their tests are not collected at all).
MISSING_SDIST_MODULES = {
    "exporters/test_export.py": "ExportTesterMixin",
    "generation/test_utils.py": "GenerationTesterMixin",
}
PIP_TIMEOUT_SECONDS = 600


def cache_root() -> Path:
    """Where downloaded test dependencies are kept between runs (outside the repository)."""
    configured = os.environ.get("CHATGLM_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "chatglm3-finetune-tests"


def unavailable(message: str, module_level: bool = False) -> None:
    """Skip with `message`, or fail under CI, where these comparisons must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI must run this comparison", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def run_pip(arguments: list[str]) -> subprocess.CompletedProcess:
    """`python -m pip ARGUMENTS` with the running interpreter, output captured."""
    command = [sys.executable, "-m", "pip", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)


def publish(staging: Path, target: Path) -> None:
    """Move a completed staging folder to `target` (another process may have published it first)."""
    if not target.exists():
        staging.rename(target)
    shutil.rmtree(staging, ignore_errors=True)


def old_stack_folder() -> Path:
    """The folder holding the old transformers/tokenizers/huggingface_hub/peft (installed once, then reused)."""
    key = hashlib.sha256(" ".join(OLD_STACK).encode()).hexdigest()[:12]
    target = cache_root() / f"old-stack-{key}"
    if (target / "transformers" / "__init__.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.installing-", dir=target.parent))
    completed = run_pip(["install", "--quiet", "--no-deps", "--target", str(staging), *OLD_STACK])
    if completed.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        unavailable(f"could not install the old stack ({' '.join(OLD_STACK)}): {completed.stderr.strip()[-400:]}")
    publish(staging, target)
    return target


def transformers_common_tests() -> Path:
    """A folder holding the package `transformers_common_tests` (the installed version's sdist tests/ files)."""
    version = transformers.__version__
    target = cache_root() / f"transformers-{version}-tests"
    package = target / "transformers_common_tests"
    if (package / "test_modeling_common.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.fetching-", dir=target.parent))
    downloaded = run_pip(
        ["download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(staging), f"transformers=={version}"]
    )
    archives = sorted(staging.glob("transformers-*.tar.gz"))
    if downloaded.returncode != 0 or not archives:
        shutil.rmtree(staging, ignore_errors=True)
        unavailable(
            f"could not download the transformers {version} sdist for its common model tests: "
            f"{downloaded.stderr.strip()[-400:]}",
            module_level=True,
        )
    staged_package = staging / "transformers_common_tests"
    staged_package.mkdir()
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archives[0]) as archive:
        for member in archive.getmembers():
            relative = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and member.isfile() and relative.endswith(".py") and "/" not in relative:
                (staged_package / relative).write_bytes(archive.extractfile(member).read())
    (staged_package / "__init__.py").write_text("", encoding="utf-8")
    for relative, mixin in MISSING_SDIST_MODULES.items():
        path = staged_package / relative
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").write_text("", encoding="utf-8")
            path.write_text(
                f'"""Not in the transformers {version} sdist: an empty stand-in."""\n\n\nclass {mixin}:\n    pass\n',
                encoding="utf-8",
            )
    archives[0].unlink()
    publish(staging, target)
    return target
