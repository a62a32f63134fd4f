"""smolfactory/ uses only public names of Lightning, torch, transformers, datasets and peft: private ones move
between minor versions (lightning-transformers and NeMo 2 both left Lightning after such hacks).

The scan reads the syntax (ast), so it finds what the code says, not what it does at run time:
- imports of a ``_``-prefixed module or name of those libraries, and ``_``-prefixed attributes read through a
  name bound to one of their modules (``torch.distributed._shard``);
- Lightning's loop internals and datasets' cache key, public-looking but internal (``INTERNAL_NAMES``);
- any other ``obj._name`` (or ``getattr(obj, "_name")``) where smolfactory itself defines no ``_name``: a
  private attribute of some library's object (``model._no_split_modules``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smolfactory"
LIBRARIES = {"lightning", "pytorch_lightning", "lightning_fabric", "torch", "transformers", "datasets", "peft"}
# Public-looking but internal: Lightning's loop objects and progress counters, datasets' cache fingerprint.
INTERNAL_NAMES = {"fit_loop", "epoch_loop", "batch_progress", "_fingerprint"}
# Documented API of namedtuples, underscored only to stay clear of field names.
NAMEDTUPLE_API = {"_fields", "_field_defaults", "_asdict", "_replace", "_make"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_path(module: str) -> bool:
    return any(is_private(part) for part in module.split("."))


def is_library(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in LIBRARIES


def own_names(files: list[Path]) -> set[str]:
    """The ``_``-prefixed names smolfactory defines itself: functions, classes, assignments, ``self._x = ...``."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):  # not library objects'
                    names.add(node.attr)
    return {name for name in names if is_private(name)}


def library_aliases(tree: ast.AST) -> dict[str, str]:
    """Names bound to a library module or object by imports: ``import torch.distributed as dist`` -> dist."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_library(alias.name):
                    bound = alias.asname or alias.name.split(".")[0]
                    aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and is_library(node.module):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def private_uses(source: str, filename: str, allowed: set[str]) -> list[str]:
    """``filename:line: what`` for each private or internal library name the source uses; ``allowed`` are the
    private names smolfactory defines itself."""
    tree = ast.parse(source, filename)
    aliases = library_aliases(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}") for a in node.names if is_library(a.name) and private_path(a.name)
            ]
        elif isinstance(node, ast.ImportFrom) and is_library(node.module):
            names = [a.name for a in node.names if is_private(a.name)]
            if private_path(node.module) or names:
                found.append((node.lineno, f"from {node.module} import {', '.join(names or ['...'])}"))
        elif isinstance(node, ast.Attribute):
            problem = attribute_problem(node, aliases, allowed)
            if problem:
                found.append((node.lineno, problem))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and is_foreign(name.value, allowed):
                    found.append((node.lineno, f'{node.func.id}(..., "{name.value}")'))
    return [f"{filename}:{line}: {what}" for line, what in sorted(set(found))]


def is_foreign(name: str, allowed: set[str]) -> bool:
    """A private name smolfactory does not define, or an internal one."""
    return name in INTERNAL_NAMES or (is_private(name) and name not in allowed and name not in NAMEDTUPLE_API)


def attribute_problem(node: ast.Attribute, aliases: dict[str, str], allowed: set[str]) -> str | None:
    """What is wrong with reading ``node`` (``x.attr``), or None."""
    if node.attr in INTERNAL_NAMES:
        return f".{node.attr}"
    if not is_private(node.attr):
        return None
    base = node.value
    while isinstance(base, ast.Attribute):
        base = base.value
    if isinstance(base, ast.Name) and base.id in aliases:  # through a library module: any private part counts
        return f"{ast.unparse(node)} ({aliases[base.id]})"
    if isinstance(base, ast.Name) and base.id in ("self", "cls") and node.value is base:
        return None  # our own object's attribute
    return ast.unparse(node) if is_foreign(node.attr, allowed) else None


def test_smolfactory_uses_only_public_library_names():
    files = sorted(PACKAGE.rglob("*.py"))
    allowed = own_names(files)
    uses = [
        use for path in files for use in private_uses(path.read_text(), str(path.relative_to(PACKAGE.parent)), allowed)
    ]
    assert not uses, "private or internal library names (use a public API):\n" + "\n".join(uses)


PRIVATE_USES = [
    "import torch.distributed._shard.sharded_tensor",
    "from lightning.fabric.utilities.load import _load_distributed_checkpoint",
    "from torch.distributed import _functional_collectives",
    "from datasets.fingerprint import _CACHING_ENABLED",
    "tf.utils._init_weights",
    "progress = trainer.fit_loop",
    "ready = loop.epoch_loop.batch_progress.current.ready",
    "classes = model._no_split_modules",
    "key = rows._fingerprint",
    'hook = getattr(model, "_hf_hook", None)',
]

PUBLIC_SNIPPET = """
import torch
from lightning.pytorch.utilities import rank_zero_info
from smolfactory.model.sft import _our_helper
torch.distributed.checkpoint.state_dict.get_model_state_dict
self._start_step = trainer.global_step
names = Sums._fields
helper = module._our_helper
"""


@pytest.mark.parametrize("use", PRIVATE_USES)
def test_the_scan_finds_each_private_use(use):
    uses = private_uses(f"import transformers as tf\n{use}\n", "snippet.py", allowed=set())
    assert {found.split(":")[1] for found in uses} == {"2"}, uses  # found, and only there


def test_the_scan_passes_public_names_and_our_own():
    assert private_uses(PUBLIC_SNIPPET, "snippet.py", allowed={"_our_helper"}) == []
