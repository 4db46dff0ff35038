"""The project is an installable package: `pip install -e .` in a fresh virtual environment gives the console scripts,
every entry point runs from any working directory with or without PYTHONPATH, no module edits sys.path, and no
module shares its package's name (which made `python inference/api_server.py` die with "'inference' is not a
package")."""

import ast
import importlib.util
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("finetune", "inference", "data_tools")
CONSOLE_SCRIPTS = (
    "chatglm3-train",
    "chatglm3-dpo",
    "chatglm3-evaluate",
    "chatglm3-chat",
    "chatglm3-serve",
    "chatglm3-export",
    "chatglm3-convert",
)
# Entry points users run as files or modules (README's command table), each answering --help with its usage.
FILE_ENTRY_POINTS = (
    ["inference.py"],
    ["inference/api_server.py"],
    ["inference/export.py"],
    ["data_tools/format_advertise_gen.py"],
    ["data_tools/format_openai.py"],
    ["data_tools/format_glm4.py"],
    ["data_tools/format_sharegpt.py"],
    ["data_tools/format_tool_alpaca.py"],
    ["data_tools/format_preference.py"],
)
MODULE_ENTRY_POINTS = (
    ["-m", "finetune.train"],
    ["-m", "finetune.preference"],
    ["-m", "finetune.evaluate"],
    ["-m", "data_tools.convert"],
)


def _project_modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py"))


def test_no_module_edits_sys_path():
    offenders = []
    for path in _project_modules() + sorted((REPO_ROOT / "scripts").glob("*.py")) + [REPO_ROOT / "inference.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"sys.path is edited in {offenders}"


def test_no_module_shares_its_package_name():
    clashes = [
        str(path.relative_to(REPO_ROOT))
        for path in _project_modules()
        if path.stem in PACKAGES or path.stem == path.parent.name
    ]
    assert not clashes


def test_console_scripts_point_at_existing_functions():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert tuple(scripts) == CONSOLE_SCRIPTS
    for name, target in scripts.items():
        module, function = target.split(":")
        tree = ast.parse((REPO_ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, name


@pytest.fixture(scope="module")
def fresh_environment(tmp_path_factory) -> Path:
    """A new virtual environment with the project installed by `pip install -e .` run by the new environment's
    python; the test environment's site-packages are visible through a .pth file, so the dependencies (torch and the
    rest), pip itself and, where the test environment has it, the build backend are not downloaded again."""
    root = tmp_path_factory.mktemp("fresh-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site_packages = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site_packages / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    # pyproject.toml's build backend; without it here (Python 3.12+ venvs have no setuptools) pip fetches it.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", *isolation, "-e", str(REPO_ROOT)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    return root


def _environment(with_pythonpath: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONPATH": str(REPO_ROOT)} if with_pythonpath else env


def _help(command: list, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command + ["--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_help_works_in_parallel(commands: list[tuple[list, bool]], cwd: Path) -> None:
    """Run each command with --help (with PYTHONPATH set to the repository where its flag says so), all at once: each
    one spends most of its time importing on one core. Each must exit 0 and print its usage."""
    processes = [
        (command, subprocess.Popen(command + ["--help"], cwd=cwd, env=_environment(with_pythonpath),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for command, with_pythonpath in commands
    ]  # fmt: skip
    for command, process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{' '.join(command)}:\n{stderr[-2000:]}"
        assert "usage:" in stdout, " ".join(command)


@pytest.mark.slow
def test_pip_install_gives_working_console_scripts_from_any_folder(fresh_environment, tmp_path):
    scripts = [([str(fresh_environment / "bin" / script)], False) for script in CONSOLE_SCRIPTS]
    _assert_help_works_in_parallel(scripts, tmp_path)
    python = str(fresh_environment / "bin" / "python")
    metadata = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('chatglm3-finetune')))"],
        cwd=tmp_path, env=_environment(with_pythonpath=False), capture_output=True, text=True, check=True,
    )  # fmt: skip
    declared = {line.split(">")[0].split("=")[0].split("<")[0] for line in metadata.stdout.splitlines()}
    assert {"torch", "transformers", "peft", "deepspeed", "datasets", "fastapi", "uvicorn"} <= declared


@pytest.mark.slow
def test_every_file_and_module_entry_point_runs_from_another_folder(fresh_environment, tmp_path):
    """Each entry point without PYTHONPATH; the server script also with PYTHONPATH set to the repository, which used to
    die with "'inference' is not a package"."""
    python = str(fresh_environment / "bin" / "python")
    commands = [([python, str(REPO_ROOT / entry[0])], False) for entry in FILE_ENTRY_POINTS]
    commands += [([python, *entry], False) for entry in MODULE_ENTRY_POINTS]
    commands += [([python, str(REPO_ROOT / "inference" / "api_server.py")], True)]
    _assert_help_works_in_parallel(commands, tmp_path)


def test_repository_root_inference_py_runs_from_another_folder(tmp_path):
    env = _environment(with_pythonpath=False)
    completed = _help([sys.executable, str(REPO_ROOT / "inference.py")], tmp_path, env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "usage:" in completed.stdout
