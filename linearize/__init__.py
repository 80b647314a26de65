"""linearize: convert pretrained Hugging Face LLMs into gated linear-recurrent hybrids.

Importing the package is cheap (no torch, no transformers: ``linearize --help`` answers at once);
its names load on first use. The converted model classes are registered with ``AutoConfig`` and
``AutoModelForCausalLM`` as soon as transformers is imported (at once if it already is), so
``AutoModelForCausalLM.from_pretrained(converted_dir)`` works after ``import linearize`` in either order.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the submodule that defines it
    "ARCHITECTURES": "arch",
    "ConversionConfig": "config",
    "conversion_parameters": "convert",
    "convert": "convert",
    "convert_to_folder": "convert",
    "save_converted": "convert",
    "LinearizeError": "errors",
    "SourceNotFoundError": "errors",
    "UnsupportedArchitectureError": "errors",
    "generate_stream": "generation",
    "iter_mixers": "mixers",
    "teacher_attention": "mixers",
}

__all__ = sorted(set(_EXPORTS) - {"ARCHITECTURES"})


class _Package(types.ModuleType):
    """``linearize`` itself: exported names import their submodule on first use; the submodule
    ``linearize.convert`` never hides the function ``linearize.convert``; importing
    ``linearize.modeling`` registers the converted classes with transformers' Auto classes."""

    def __getattr__(self, name: str):
        if name in _EXPORTS:
            value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            value = importlib.import_module(f"{__name__}.{name}")  # linearize.sources etc. without an import
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        setattr(self, name, value)
        return getattr(self, name)  # (setattr keeps the function linearize.convert over its module)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":  # a submodule loaded
            if name == "modeling":
                value.register_auto_classes(importlib.import_module(f"{__name__}.arch").ARCHITECTURES)
            if _EXPORTS.get(name) == name:  # linearize.convert: keep the function
                value = getattr(value, name)
        super().__setattr__(name, value)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports ``linearize.modeling`` (which registers the Auto classes) right after transformers loads."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module(f"{__name__}.modeling")

        spec.loader.exec_module = exec_then_register
        return spec


sys.modules[__name__].__class__ = _Package
if sys.modules.get("transformers") is not None:
    importlib.import_module(f"{__name__}.modeling")
else:
    sys.meta_path.insert(0, _RegisterWithTransformers())
