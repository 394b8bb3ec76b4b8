"""Load the repository root as the package ``kinema``, the way ComfyUI loads a pack.

The checkout's folder name never matters: the root ``__init__.py`` is imported
under one fixed name with the root as its package path.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_pack():
    if "kinema" in sys.modules:
        return sys.modules["kinema"]
    spec = importlib.util.spec_from_file_location(
        "kinema", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kinema"] = module
    spec.loader.exec_module(module)
    return module


_load_pack()
