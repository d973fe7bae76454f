"""The package's shape (docs/architecture.md): layers that import downward only, no import cycles, small modules,
the model organism as a guest, and a light ``import emis_interp``.

Imports are read from the source (``ast``), function-level (lazy) imports included, so a cycle hidden in a function
body counts. A module importing its own parent package (``from . import x``) is not an edge: the parent is always
imported first anyway.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "emis_interp"

# Bottom to top. A module may import modules of its own layer or below; the organism (a guest) sits above the whole
# toolkit, and nothing in the toolkit imports it.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "stats", "cache"]),
    ("identity", ["manifest", "fingerprint"]),
    ("inputs", ["conversations", "data", "adapters", "gguf", "models", "fetch"]),
    ("hooks", ["hooks"]),
    ("activations", ["capture"]),
    ("directions", ["directions"]),
    ("readouts", ["interop", "lens", "attribution", "metrics", "judges.*"]),
    ("batched adapters", ["lora_bank"]),
    ("interventions", ["interventions"]),
    ("generation", ["sampling", "export"]),
    ("training and experiments", ["train_interventions", "finetune", "causality", "monitor"]),
    ("trajectories", ["trajectory", "weights"]),
    ("analyses", ["screen", "behaviour", "real_trajectory"]),
    ("figures", ["plots"]),
    ("command line", ["cliargs", "cli"]),
    ("package", [""]),
    ("organism world", ["organism.world"]),
    ("organism model", ["organism.model", "organism.prompts"]),
    ("organism judges and runs", ["organism.judges", "organism.recipes", "organism.directions"]),
    ("organism registration", ["organism.register", "organism"]),
    ("organism report", ["organism.report"]),
    ("organism matrix", ["organism.matrix.*"]),
]

# The only imports that run up the layers: each is a function-level import, for the reason given.
UPWARD_ALLOWED = {
    # PersonaDirection.save("x.gguf") writes a llama.cpp control vector through the interop layer, which reads
    # directions: the file format belongs to interop, the convenience to the direction
    ("directions", "interop"): "PersonaDirection.save(path.gguf) delegates to interop.write_gguf_control_vector",
    # LoraBank.attach(model, names) is the one-line way to run rows through adapters; it is an Intervention
    # holding only the bank, which lives in the intervention engine above the bank
    ("lora_bank", "interventions"): "LoraBank.attach wraps Intervention(lora=...).attach",
    # screen_datasets writes its histogram as it finishes; the figure code (plots) reads screen results
    ("screen", "plots"): "screen_datasets saves screen_histogram beside its CSV",
}
MAX_LINES = 700
LONGER: dict[str, tuple[int, str]] = {}  # modules allowed over MAX_LINES, with the reason; shrink, never grow


def _short(module: str) -> str:
    return module.removeprefix("emis_interp").removeprefix(".")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = p
    return out


def _imports(path: Path, name: str, modules) -> dict[str, bool]:
    """``{imported module: at module level}`` for one module (package-internal imports only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    top |= {id(n) for stmt in tree.body if isinstance(stmt, ast.If | ast.Try) for n in ast.walk(stmt)}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found = [t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in modules]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name in modules]
        else:
            continue
        for t in found:
            if t != name and not name.startswith(t + "."):  # a module's own parent packages are not edges
                out[t] = out.get(t, False) or id(node) in top
    return out


def _layer_of() -> dict[str, int]:
    out = {}
    for i, (_, mods) in enumerate(LAYERS):
        for m in mods:
            out[m] = i
    return out


def _layer(module: str, layers: dict[str, int]) -> int:
    short = _short(module)
    if short in layers:
        return layers[short]
    for pattern, i in layers.items():
        if pattern.endswith(".*") and (short == pattern[:-2] or short.startswith(pattern[:-1])):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py LAYERS; add it (and to the docs)")


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def test_every_module_has_a_layer_and_imports_only_downward(graph):
    layers = _layer_of()
    upward = {}
    for a, targets in graph.items():
        for b, at_top in targets.items():
            if _layer(b, layers) > _layer(a, layers):
                upward[(_short(a), _short(b))] = at_top
    unexplained = sorted(set(upward) - set(UPWARD_ALLOWED))
    assert not unexplained, (
        f"imports that run up the layers (import downward, or explain in UPWARD_ALLOWED): {unexplained}"
    )
    assert len(UPWARD_ALLOWED) <= 4
    assert not [e for e, at_top in upward.items() if at_top], "an allowed upward import must be function-level"
    stale = sorted(set(UPWARD_ALLOWED) - set(upward))
    assert not stale, f"UPWARD_ALLOWED lists imports that no longer exist: {stale}"


def test_no_import_cycles(graph):
    """No cycle among the imports, lazy ones included (the allowed upward imports aside)."""
    edges = {a: {b for b in targets if (_short(a), _short(b)) not in UPWARD_ALLOWED} for a, targets in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(w) :] + [w]))
            if w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v)


def test_general_modules_never_import_the_organism(graph):
    leaks = sorted(
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if not _short(a).startswith("organism") and _short(b).startswith("organism")
    )
    assert not leaks, f"the organism is a guest: general modules must not import it: {leaks}"


def test_modules_are_small():
    too_long = {}
    for name, p in _modules().items():
        n = len(p.read_text().splitlines())
        limit = LONGER.get(_short(name), (MAX_LINES,))[0]
        if n > limit:
            too_long[_short(name)] = n
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_import_is_light():
    """``import emis_interp`` loads neither plotly nor the organism (its report and matrix above all)."""
    code = (
        "import sys, emis_interp; "
        "print(sorted(m for m in sys.modules if m == 'plotly' or m.startswith(('plotly.', 'emis_interp.organism'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_without_a_registered_subject_names_the_fix():
    """Without ``--model`` the CLI runs on a registered default subject; none registered (the organism not imported)
    is an error that names the fix, never a silent import of the organism."""
    code = (
        "import argparse, emis_interp.cli as c\n"
        "ap = argparse.ArgumentParser(); c.add_common(ap)\n"
        "try:\n    c.resolve(ap.parse_args([]))\nexcept SystemExit as e:\n    print(e)\n"
        "import sys; print('organism' in ' '.join(m for m in sys.modules if m.startswith('emis_interp.organism')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent)
    assert "import emis_interp.organism" in out.stdout and out.stdout.strip().endswith("False"), out.stdout
