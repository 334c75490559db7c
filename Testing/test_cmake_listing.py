"""The packaged extension carries every file: each .py of the module and of DeepSSMLogic and each
resource must be listed in DeepSSMExtension/CMakeLists.txt (the classic "works from source, broken
when packaged" bug). The tree is globbed at test time, so a new file fails this test until listed.

Run ``python Testing/test_cmake_listing.py`` to print the lists, ``--write`` to update the CMake
file in place (a new DeepSSMLogic sub-package still needs its variable passed to the ctk macro).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_CMAKE = REPO / "DeepSSMExtension" / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


def cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME a b c)`` blocks of a CMake file (comments stripped, ${VAR} kept verbatim)."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"\bset\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s+([^)]*)\)", text, re.IGNORECASE):
        out[m.group(1)] = [v.strip('"') for v in m.group(2).split()]
    return out


def _files(root: Path, pattern: str) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.glob(pattern)
        if p.is_file() and not IGNORED_PARTS & set(p.parts)
    )


def expected_lists() -> dict[str, list[str]]:
    """What the tree holds, per CMake variable."""
    ext = REPO / "DeepSSMExtension"
    logic = [f for f in _files(REPO, "DeepSSMLogic/**/*.py")]
    subpackages = {"ANALYSIS": "analysis", "AUGMENT": "augment", "COMMANDS": "commands"}
    lists = {
        "DEEPSSM_MODULE_SCRIPTS": _files(ext, "*.py"),
        "DEEPSSM_LIB_SCRIPTS": _files(ext, "DeepSSMLib/**/*.py"),
        "DEEPSSM_TESTING_SCRIPTS": _files(ext, "Testing/**/*.py"),
        "DEEPSSMLOGIC_SCRIPTS": [f for f in logic if f.count("/") == 1],
        "DEEPSSM_RESOURCES": _files(REPO, "Resources/**/*"),
    }
    for key, sub in subpackages.items():
        lists[f"DEEPSSMLOGIC_{key}_SCRIPTS"] = [f for f in logic if f.startswith(f"DeepSSMLogic/{sub}/")]
    other = sorted({f.split("/")[1] for f in logic if f.count("/") > 1} - set(subpackages.values()))
    for sub in other:  # a new sub-package needs its own variable
        lists[f"DEEPSSMLOGIC_{sub.upper()}_SCRIPTS"] = [
            f for f in logic if f.startswith(f"DeepSSMLogic/{sub}/")
        ]
    return lists


def test_every_python_file_and_resource_is_listed():
    sets = cmake_sets(MODULE_CMAKE)
    problems = []
    for var, files in expected_lists().items():
        listed = set(sets.get(var, []))
        missing = [f for f in files if f not in listed]
        if missing:
            problems.append(f"{var} lacks: " + ", ".join(missing))
    assert not problems, (
        "DeepSSMExtension/CMakeLists.txt does not list every file (it would be missing from the packaged "
        "extension):\n  "
        + "\n  ".join(problems)
        + "\nRun `python Testing/test_cmake_listing.py` for the lists."
    )


def test_every_listed_file_exists():
    sets = cmake_sets(MODULE_CMAKE)
    roots = {
        "DEEPSSM_MODULE_SCRIPTS": REPO / "DeepSSMExtension",
        "DEEPSSM_LIB_SCRIPTS": REPO / "DeepSSMExtension",
        "DEEPSSM_TESTING_SCRIPTS": REPO / "DeepSSMExtension",
    }
    missing = []
    for var, files in sets.items():
        if not (var.startswith("DEEPSSM") and (var.endswith("_SCRIPTS") or var.endswith("_RESOURCES"))):
            continue
        root = roots.get(var, REPO)
        missing += [f"{var}: {f}" for f in files if not (root / f).is_file()]
    assert not missing, "listed but not in the tree: " + ", ".join(missing)


def test_every_list_is_passed_to_a_build_macro():
    text = re.sub(r"#[^\n]*", "", MODULE_CMAKE.read_text(encoding="utf-8"))
    for var in expected_lists():
        assert f"${{{var}}}" in text, f"{var} is defined but not given to slicerMacroBuildScriptedModule/ctk"
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert re.search(r"SOURCE_DIR\s+\$\{DEEPSSM_REPO_ROOT\}", text)


def test_extension_metadata():
    sets = cmake_sets(TOP_CMAKE)
    text = TOP_CMAKE.read_text(encoding="utf-8")
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_CONTRIBUTORS",
    ):
        assert key in sets, f"{key} missing from CMakeLists.txt"
    assert re.search(r'set\(EXTENSION_CATEGORY "Shape Analysis"\)', text)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "add_subdirectory(DeepSSMExtension)" in text
    assert sets["EXTENSION_SCREENSHOTURLS"][0].endswith("docs/screenshot.png")
    assert sets["EXTENSION_ICONURL"][0].endswith("Resources/Icons/DeepSSM.png")
    assert (REPO / "docs" / "screenshot.png").is_file() and (
        REPO / "Resources" / "Icons" / "DeepSSM.png"
    ).is_file()


def test_requirements_never_list_torch_or_simpleitk():
    lines = [
        line.split("#")[0].strip().lower()
        for line in (REPO / "Resources" / "requirements.txt").read_text().splitlines()
    ]
    names = {re.split(r"[<>=!~\[; ]", line)[0] for line in lines if line}
    assert names and not names & {"torch", "torchvision", "simpleitk", "vtk", "numpy"}


def _block(var: str, files: list[str]) -> str:
    return f"set({var}\n" + "".join(f"  {f}\n" for f in files) + "  )"


def write_lists(path: Path = MODULE_CMAKE) -> None:
    """Rewrite each ``set(VAR ...)`` file list in place from the tree."""
    text = path.read_text(encoding="utf-8")
    for var, files in expected_lists().items():
        pattern = re.compile(rf"set\({var}\b[^)]*\)")
        if pattern.search(text):
            text = pattern.sub(lambda _m, v=var, f=files: _block(v, f), text)
        else:
            text = text.replace("# Resources", _block(var, files) + "\n\n# Resources", 1)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write_lists()
        print(f"updated {MODULE_CMAKE}")
    else:
        for var, files in expected_lists().items():
            print(_block(var, files) + "\n")
    sys.exit(0)
