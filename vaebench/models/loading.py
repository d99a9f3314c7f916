"""``--model SPEC`` → a module: built-in names, ``path/to/file.py:factory`` and ``package.module:factory``.

A user model is code. vaebench imports it only when the user names it on the command line (or passes
it to the library); a run directory records the SPEC, the factory arguments and the SHA-256 of the
model file (:func:`spec_digest`), and loading a run of a user model needs the same SPEC again, with a
file whose hash has not changed (:func:`check_same_model`). Nothing is ever imported because a
results directory names it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from vaebench.models.builtin import BUILTIN_MODELS
from vaebench.models.contract import ModelContractError


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN_MODELS


def _split(spec: str) -> tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ModelContractError(f"--model {spec!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor "
                                 "path/to/file.py:factory or package.module:factory")
    return target, name


def model_file(spec: str) -> Path | None:
    """The source file a user SPEC names (``None`` for built-ins)."""
    if is_builtin(spec):
        return None
    target, _ = _split(spec)
    if target.endswith(".py"):
        return Path(target)
    found = importlib.util.find_spec(target) if _module_importable(target) else None
    if found is None or found.origin is None:
        raise ModelContractError(f"--model {spec!r}: no module {target!r} on the Python path")
    return Path(found.origin)


def _module_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_digest(spec: str) -> str | None:
    """SHA-256 of the file behind a user SPEC; ``None`` for built-ins."""
    path = model_file(spec)
    if path is None:
        return None
    if not path.is_file():
        raise ModelContractError(f"--model {spec!r}: file {path} does not exist")
    return file_sha256(path)


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import the factory a SPEC names (or return the built-in one)."""
    if is_builtin(spec):
        return BUILTIN_MODELS[spec]
    target, name = _split(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelContractError(f"--model {spec!r}: file {path} does not exist")
        module_name = f"vaebench_user_model_{file_sha256(path)[:16]}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                raise ModelContractError(f"--model {spec!r}: importing {path} raised {type(exc).__name__}: "
                                         f"{_first_line(exc)}") from None
            sys.modules[module_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelContractError(f"--model {spec!r}: cannot import {target!r} ({type(exc).__name__}: "
                                     f"{_first_line(exc)})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelContractError(f"--model {spec!r}: {target} has no callable {name!r}")
    return factory


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def instantiate(spec: str, data_dim: int, args: Mapping[str, Any]) -> nn.Module:
    """Call the factory of ``spec`` as ``factory(data_dim=P, **args)`` and check what it returns."""
    factory = resolve_factory(spec)
    try:
        module = factory(data_dim=data_dim, **dict(args))
    except ModelContractError:
        raise
    except Exception as exc:
        raise ModelContractError(f"--model {spec!r}: the factory raised {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from None
    if not isinstance(module, nn.Module) or not callable(getattr(module, "model", None)):
        raise ModelContractError(f"--model {spec!r}: the factory returned {type(module).__name__}, not a "
                                 "torch.nn.Module with a model(x) method")
    return module


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["latent_dim=8", "name=foo"]`` → ``{"latent_dim": 8, "name": "foo"}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelContractError(f"--model-arg {item!r} is not KEY=VALUE with KEY a Python identifier")
        if key == "data_dim":
            raise ModelContractError("--model-arg data_dim is set by vaebench from the data set")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def check_same_model(recorded_spec: str, recorded_sha256: str | None, given_spec: str | None, where: str) -> None:
    """Refuse to rebuild a user model unless the same SPEC is given again and its file is unchanged."""
    if is_builtin(recorded_spec):
        if given_spec is not None and given_spec != recorded_spec:
            raise ModelContractError(f"{where} holds built-in model {recorded_spec!r}, not --model {given_spec!r}")
        return
    if given_spec is None:
        raise ModelContractError(f"{where} was trained with user model {recorded_spec!r}; pass --model "
                                 f"{recorded_spec} again (vaebench never imports code because a run directory "
                                 "names it)")
    if given_spec != recorded_spec:
        raise ModelContractError(f"{where} was trained with --model {recorded_spec!r}, not {given_spec!r}")
    digest = spec_digest(given_spec)
    if recorded_sha256 is not None and digest != recorded_sha256:
        raise ModelContractError(f"the file of --model {given_spec} has changed since {where} was trained "
                                 f"(SHA-256 {digest[:12]}…, recorded {recorded_sha256[:12]}…)")


def make_model_config(spec: str, data_dim: int, *, real_valued: bool, encoder: bool = True,
                      model_args: Mapping[str, Any] | None = None, guide: str | None = None,
                      flows: int | None = None, latent_dim: int | None = None,
                      hidden: tuple[int, ...] | None = None, activation: str | None = None,
                      likelihood: str | None = None, gaussian_scale: float | None = None,
                      encoder_hidden: tuple[int, ...] | None = None, default_latent_dim: int = 50):
    """The :class:`~vaebench.config.ModelConfig` of ``--model SPEC`` and its options, validated.

    The architecture options (``latent_dim``, ``hidden``, ``likelihood``, ``gaussian_scale``) configure
    the built-ins ``mlp`` and ``linear`` only; a user model takes its settings from ``model_args``
    (``--model-arg``), so giving both is refused. ``guide=None`` means ``auto`` (the module's own guide
    when it has one, else ``gaussian``); ``flows=None`` means 2 for ``iaf`` and 0 otherwise.
    """
    from vaebench.config import DECODERS, ModelConfig

    architecture = {"--latent-dim": latent_dim, "--hidden": hidden, "--likelihood": likelihood,
                    "--gaussian-scale": gaussian_scale}
    if spec not in DECODERS:
        given = [name for name, value in architecture.items() if value is not None]
        if given:
            raise ModelContractError(f"{', '.join(given)} configure the built-in models {' and '.join(DECODERS)}; "
                                     f"pass --model-arg KEY=VALUE to {spec!r} instead")
    if flows is not None and guide != "iaf":
        raise ModelContractError(f"--flows applies to --guide iaf, not --guide {guide or 'auto'}")
    sha = spec_digest(spec)
    return ModelConfig(
        data_dim=data_dim, model=spec, model_args=dict(model_args or {}), model_sha256=sha,
        latent_dim=latent_dim or default_latent_dim, hidden=hidden if hidden is not None else (200, 200),
        activation=activation or "tanh", likelihood=likelihood or ("gaussian" if real_valued else "bernoulli"),
        gaussian_scale=gaussian_scale, encoder=encoder, encoder_hidden=encoder_hidden, guide=guide or "auto",
        flows=(flows if flows is not None else 2) if guide == "iaf" else 0)
