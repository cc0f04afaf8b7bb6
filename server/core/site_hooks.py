"""Per-row task parameters at a family's sites, applied by hooks on Hugging Face's own modules.

The hooks are installed once per model and read the parameters of the forward in progress from a
context variable, so concurrent forwards on other threads see their own batch and a forward outside
`active()` is the bare backbone.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from switchboard.server.core.families.base import Family, SiteRef

_ATTRIBUTE = "_switchboard_site_hooks"


def _apply(params: Any, site: str, ref: SiteRef, x: torch.Tensor, layer: int, module: torch.nn.Module) -> torch.Tensor:
    for part in params.at(site):
        if ref.part is None:
            x = part.apply(site, x, layer, module)
            continue
        index, parts = ref.part
        width = x.shape[-1] // parts
        piece = x[..., index * width:(index + 1) * width]
        done = part.apply(site, piece, layer, module)
        if done is not piece:  # out of place (training): splice the slice back in
            x = torch.cat([x[..., : index * width], done, x[..., (index + 1) * width:]], dim=-1)
    return x


class SiteHooks:
    """The hooks of one model; `active(params)` makes a batch's parameters visible to them."""

    def __init__(self, model: torch.nn.Module, family: Family) -> None:
        self._current: ContextVar[Any] = ContextVar(f"switchboard_params_{id(self)}", default=None)
        self._handles: list[Any] = []
        grouped: dict[tuple[int, str], tuple[torch.nn.Module, str, int, list[tuple[str, SiteRef]]]] = {}
        for site, ref in family.sites.items():
            for layer, block in enumerate(model.get_submodule(ref.stack)):
                module = block.get_submodule(ref.path)
                entry = grouped.setdefault((id(module), ref.where), (module, ref.where, layer, []))
                entry[3].append((site, ref))
        for module, where, layer, sites in grouped.values():
            if where == "in":
                self._handles.append(module.register_forward_pre_hook(self._input_hook(sites, layer, module)))
            elif where == "out":
                self._handles.append(module.register_forward_hook(self._output_hook(sites, layer, module)))
            else:
                self._handles.append(module.register_forward_hook(self._norm_hook(sites[0][0], layer, module)))
        if family.install is not None:
            family.install(model, self)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A copied model gets hooks of its own on first use; the copied hook functions stay inert there
        (each checks that it runs on the module it was installed on)."""
        return None

    def params(self) -> Any:
        return self._current.get()

    @contextmanager
    def active(self, params: Any) -> Iterator[None]:
        token = self._current.set(params)
        try:
            yield
        finally:
            self._current.reset(token)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_hook(self, sites: list[tuple[str, SiteRef]], layer: int, owner: torch.nn.Module) -> Any:
        home = weakref.ref(owner)

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            params = self._current.get()
            if params is None or module is not home():
                return None
            x = args[0]
            for site, ref in sites:
                x = _apply(params, site, ref, x, layer, module)
            return (x, *args[1:])
        return hook

    def _output_hook(self, sites: list[tuple[str, SiteRef]], layer: int, owner: torch.nn.Module) -> Any:
        home = weakref.ref(owner)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            params = self._current.get()
            if params is None or module is not home():
                return None
            for site, ref in sites:
                output = _apply(params, site, ref, output, layer, module)
            return output
        return hook

    def _norm_hook(self, site: str, layer: int, owner: torch.nn.Module) -> Any:
        home = weakref.ref(owner)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            params = self._current.get()
            parts = params.at(site) if params is not None and module is home() else ()
            if not parts:
                return None
            return parts[0].apply(site, args[0], layer, module).to(args[0].dtype)  # float32 pools, bf16 stream
        return hook


_INSTALLING = threading.Lock()  # one installation at a time: two threads must not both hook one model


def site_hooks(model: torch.nn.Module, family: Family) -> SiteHooks:
    """The model's hooks, installed on first use (again after precision conversion replaced modules)."""
    hooks: SiteHooks | None = model.__dict__.get(_ATTRIBUTE)
    if hooks is None:
        with _INSTALLING:
            hooks = model.__dict__.get(_ATTRIBUTE)
            if hooks is None:
                hooks = SiteHooks(model, family)
                model.__dict__[_ATTRIBUTE] = hooks
    return hooks


def reinstall(model: torch.nn.Module, family: Family) -> SiteHooks | None:
    """Fresh hooks (after precision conversion replaced modules); none for a functional family."""
    if family.functional:
        return None
    with _INSTALLING:
        hooks: SiteHooks | None = model.__dict__.pop(_ATTRIBUTE, None)
        if hooks is not None:
            hooks.remove()
    return site_hooks(model, family)
