"""The layout README promises: scripts at the top, the library in novelgpt/, every import pointing down the list."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"prepare", "train", "sample", "serve", "evaluate", "export", "bench"}


def imported_names(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (inside functions too), as 'novelgpt.x' or 'x'."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "novelgpt":
            names |= {f"novelgpt.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def readme_package_order() -> list[str]:
    """The package's modules in the order README's Layout lists them (lowest first)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):]
    section = section[section.index("| module |"):]
    section = section[:section.index("\n\n")]
    return re.findall(r"^\| `(\w+)\.py` \|", section, re.M)


def test_the_top_level_holds_only_the_scripts_and_the_two_card_modules():
    assert {p.stem for p in ROOT.glob("*.py")} == SCRIPTS | {"model", "configurator"}


def test_model_and_configurator_import_nothing_of_the_project():
    for name in ("model", "configurator"):
        local = {n for n in imported_names(ROOT / f"{name}.py") if n.split(".")[0] in SCRIPTS | {"novelgpt", "model", "configurator"}}
        assert local == set(), (name, local)


def test_every_package_module_is_listed_and_imports_only_what_is_listed_before_it():
    order = readme_package_order()
    on_disk = sorted(p.stem for p in (ROOT / "novelgpt").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == on_disk, "README's Layout table and novelgpt/ disagree"
    for position, name in enumerate(order):
        allowed = {"model", "configurator"} | {f"novelgpt.{below}" for below in order[:position]}
        imports = imported_names(ROOT / "novelgpt" / f"{name}.py")
        local = {n for n in imports if n.split(".")[0] in SCRIPTS | {"novelgpt", "model", "configurator"}}
        assert local <= allowed, f"novelgpt/{name}.py imports {sorted(local - allowed)}, listed after it or a script"
