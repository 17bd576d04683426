"""A stand-in for torchvision in SGLang's CPU worker, where no torchvision can run: PyPI's build for this torch is a
CUDA build, whose `_C` fails to load beside the CPU torch (`operator torchvision::nms does not exist`).

sglang 0.5.23 imports torchvision with its configs, for image models (`srt/configs/__init__.py:71` ->
`srt/multimodal/internvl_utils.py:5`), and uses it only when it processes images, which text generation never does.
So every `torchvision` module imports here, and every name in it stands for nothing: using one raises
`TorchvisionMissing` naming it. transformers must not take the stand-in for torchvision: `install` is called only
after transformers has looked for torchvision and found none (`startup.py`).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, NoReturn


class TorchvisionMissing(ImportError):
    """Something of torchvision was used in a process where it stands in for nothing."""


class Missing:
    """A name of torchvision (`torchvision.transforms.Compose`...): any use of it raises, naming it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _missing(self) -> NoReturn:
        raise TorchvisionMissing(f"{self._name}: torchvision is not installed here (PyPI's build needs CUDA); "
                                 "npugraph-harness's stand-in only lets SGLang import its image-model modules")

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):
            raise AttributeError(name)
        Missing(f"{self._name}.{name}")._missing()

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._missing()

    def __repr__(self) -> str:
        return f"<missing {self._name}>"


class StandInModule(types.ModuleType):
    """`torchvision` or one of its submodules: each name in it is `Missing`."""

    def __getattr__(self, name: str) -> Missing:
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{self.__name__}.{name}")


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `torchvision` and every `torchvision.*` as a `StandInModule` (a package, so that submodules import)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin="npugraph-harness stand-in", is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> StandInModule:
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Let `import torchvision...` find the stand-in in this process, unless a torchvision is importable."""
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, StandInFinder())
