"""Self-contained remote code for converted checkpoints (``trust_remote_code=True``).

The runtime modules (config, arch table, cache, mixers, chunked kernels of GLA and the delta rule,
model classes) are copied flat into the checkpoint folder with their package-relative imports
rewritten to the flat names, plus two small entry files that ``config.json``'s ``auto_map`` points at. A Python with only torch
and transformers then loads the checkpoint; where ``linearize`` is installed too, the Triton
kernels are picked up from it.

The sources are read once, when this module loads (``linearize.convert`` imports it: the start of
a convert or a finetune), not when a checkpoint is saved: a finetune that saves hours later writes
the code its process runs, even if linearize was upgraded or the checkout edited meanwhile.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent

# Source module (relative to the package) -> flat file name in the checkpoint.
RUNTIME_MODULES = {
    "errors": "linearize_errors",
    "config": "linearize_config",
    "arch": "linearize_arch",
    "cache": "linearize_cache",
    "kernels": "linearize_kernels",
    "kernels.validate": "linearize_kernels_validate",
    "kernels.chunked": "linearize_kernels_chunked",
    "kernels.chunked_backward": "linearize_kernels_chunked_backward",
    "kernels.reference": "linearize_kernels_reference",
    "kernels.delta": "linearize_kernels_delta",
    "kernels.delta_chunked": "linearize_kernels_delta_chunked",
    "kernels.delta_reference": "linearize_kernels_delta_reference",
    "kernels.delta_validate": "linearize_kernels_delta_validate",
    "mixers": "linearize_mixers",
    "mixers.parts": "linearize_mixers_parts",
    "mixers.hybrid": "linearize_mixers_hybrid",
    "mixers.window_only": "linearize_mixers_window_only",
    "mixers.delta": "linearize_mixers_delta",
    "surgery": "linearize_surgery",
    "modeling": "linearize_modeling",
}

CONFIG_ENTRY = "configuration_linearize"
MODEL_ENTRY = "modeling_linearize"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_ENTRY}.LinearizeConfig",
    "AutoModelForCausalLM": f"{MODEL_ENTRY}.LinearizeForCausalLM",
}

_RELATIVE_IMPORT = re.compile(r"^(\s*)from (\.+)([\w.]+) import ", re.MULTILINE)
# ``from . import name, ...`` on one line (names of a package: submodules or attributes of its __init__).
_PACKAGE_IMPORT = re.compile(r"^(\s*)from (\.+) import ([\w, ]+)$", re.MULTILINE)
# ``from . import (`` over several lines: the names come from the package's flat file.
_PACKAGE_IMPORT_OTHER = re.compile(r"^(\s*)from (\.+)() import (?=\()", re.MULTILINE)


def _source_path(module: str) -> Path:
    path = PACKAGE_ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _read_sources() -> dict[str, tuple[bool, str]]:
    """Runtime module -> (is a package, its source text), read from the installed files."""
    return {module: (_source_path(module).name == "__init__.py", _source_path(module).read_text())
            for module in RUNTIME_MODULES}


_SOURCES = _read_sources()


def _rewrite_imports(module: str, text: str, is_package: bool) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]

    def resolve(dots: str, rest: str) -> str:
        base = package[: len(package) - (len(dots) - 1)] if len(dots) > 1 else package
        target = ".".join([*base, *([rest] if rest else [])])
        if target not in RUNTIME_MODULES:
            raise ValueError(f"{module} imports .{rest} ({target}), which is not in export.RUNTIME_MODULES")
        return target

    def flat(match: re.Match) -> str:
        indent, dots, rest = match.groups()
        return f"{indent}from .{RUNTIME_MODULES[resolve(dots, rest)]} import "

    def flat_names(match: re.Match) -> str:
        """``from . import chunked, f``: a submodule becomes its flat file (the flat files have no
        packages), any other name comes from the package's own flat file."""
        indent, dots, names = match.groups()
        package_file = RUNTIME_MODULES[resolve(dots, "")]
        lines = []
        for name in (n.strip() for n in names.split(",") if n.strip()):
            sub = f"{resolve(dots, '')}.{name}"
            lines.append(f"{indent}from . import {RUNTIME_MODULES[sub]} as {name}" if sub in RUNTIME_MODULES
                         else f"{indent}from .{package_file} import {name}")
        return "\n".join(lines)

    text = _RELATIVE_IMPORT.sub(flat, text)  # first: its output no longer matches the patterns below
    return _PACKAGE_IMPORT_OTHER.sub(flat, _PACKAGE_IMPORT.sub(flat_names, text))


def write_remote_code(folder: str | Path, base_type: str) -> list[str]:
    """Write the flat runtime files and the auto_map entry files into ``folder``; returns their names."""
    folder = Path(folder)
    written = []
    for module, name in RUNTIME_MODULES.items():
        is_package, source = _SOURCES[module]
        text = _rewrite_imports(module, source, is_package)
        (folder / f"{name}.py").write_text(text)
        written.append(f"{name}.py")
    (folder / f"{CONFIG_ENTRY}.py").write_text(
        '"""Config class of this linearized checkpoint (generated by linearize)."""\n\n'
        f"from .{RUNTIME_MODULES['modeling']} import linearized_classes\n\n"
        f"LinearizeConfig = linearized_classes({base_type!r})[0]\n"
    )
    (folder / f"{MODEL_ENTRY}.py").write_text(
        '"""Model class of this linearized checkpoint (generated by linearize)."""\n\n'
        f"from .{CONFIG_ENTRY} import LinearizeConfig  # noqa: F401  (same class the model uses)\n"
        f"from .{RUNTIME_MODULES['modeling']} import linearized_classes\n\n"
        f"LinearizeForCausalLM = linearized_classes({base_type!r})[1]\n"
    )
    return written + [f"{CONFIG_ENTRY}.py", f"{MODEL_ENTRY}.py"]
