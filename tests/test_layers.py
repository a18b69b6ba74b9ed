"""The layers: model <- export <- engine <- service <- imm. Each module imports only from its own layer
and the layers to its left (read from the source, every import, top-level or inside a function).
``imm`` stands beside ``service`` on the engine: only its command dispatcher (``imm serve``) reaches
into ``service``, lazily, and the Python API never loads the HTTP stack (tested below)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["model", "export", "engine", "service", "imm"]
HTTP_PACKAGES = ("fastapi", "starlette", "uvicorn")


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for rank, layer in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((ROOT / layer).rglob("*.py")):
            for package in imported_packages(path) - allowed:
                upward.append(f"{path.relative_to(ROOT)} imports {package}")
    assert not upward, upward


def test_the_runtimes_do_not_import_each_other_or_the_exporter():
    runtimes = ROOT / "engine" / "runtimes"
    onnx_side = (runtimes / "onnx.py").read_text() + (runtimes / "base.py").read_text()
    assert "pytorch" not in onnx_side and "import torch" not in onnx_side
    pytorch = (runtimes / "pytorch.py").read_text()
    assert "runtimes.onnx" not in pytorch and "onnx_export" not in pytorch


def test_what_the_cpu_server_imports_never_imports_torch():
    # model.tasks is asked by every layer, the server's included; export.bundle and export.outputs
    # read and decode bundles for the ONNX runtime.
    modules = "model.tasks, model.config, export.bundle, export.outputs, engine.runtimes.onnx"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_engine_imports_no_http_package():
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [
                f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in HTTP_PACKAGES
            ]
    assert not found, found


def test_only_the_serve_command_of_imm_reaches_into_service():
    reaching = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "imm").rglob("*.py"))
        if "service" in imported_packages(path)
    ]
    assert reaching == ["imm/cli.py"], reaching


def test_the_python_api_answers_without_loading_the_http_stack():
    code = (
        "import sys, imm; nlp = imm.load('weights', re=''); nlp.ner('Alice in Paris'); nlp.close(); "
        f"print(sorted(m for m in {HTTP_PACKAGES!r} if m in sys.modules))"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_imports_another_that_imports_it_back():
    """No circle among the project's modules (imports anywhere in a module, lazy ones included)."""
    modules = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        # A package's __init__ is the package: "from imm import X" reaches imm/__init__.py only.
        edges[name] = {t for t in targets if t in modules and t != name}
    circles = [
        f"{a} <-> {b}"
        for a, targets in edges.items()
        for b in targets
        if a in edges.get(b, set()) and a < b and not (a.startswith(b + ".") or b.startswith(a + "."))
    ]
    assert not circles, circles
