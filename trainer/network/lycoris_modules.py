"""LyCORIS types: the modules that lycoris-lora's kohya entry point builds on Nekoya's models.

kohya_ss trains these types by running ``lycoris.kohya.create_network`` with its ``network_args``; Nekoya
calls the same function with the same arguments, on its own text encoders and UNet (SDXL: the SGM naming
view, whose blocks carry sd-scripts' class names). Only the module names are Nekoya's: they are the keys
sd-scripts' models give the same layers (the text encoders' ``text_model`` level included).
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch import nn

from trainer.network_spec import NetworkConfigError, NetworkSpec

from .targets import LoraTarget, Role, lora_name

# lycoris keeps the preset in class attributes of LycorisNetworkKohya: one build at a time, and put back after
_BUILD_LOCK = threading.Lock()
_PRESET_ATTRIBUTES = ("apply_preset", "ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                      "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                      "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


def build_lycoris_modules(targets: list[LoraTarget], spec: NetworkSpec,
                          init_generator: torch.Generator | None) -> list[tuple[str, nn.Module, Role]]:
    """(kohya key name, LyCORIS module, role) for every layer the type and preset train."""
    from lycoris import kohya as lycoris_kohya  # imported by LyCORIS runs only

    unets = [t.root for t in targets if t.role is Role.UNET]
    encoders = [t.root for t in targets if t.role is Role.TEXT_ENCODER]
    names = _kohya_names(targets)
    network_class = lycoris_kohya.LycorisNetworkKohya
    with _BUILD_LOCK, _kept_class_state(network_class), _seeded(init_generator), _quiet():
        _no_double_time_embedding(network_class)
        try:
            network = lycoris_kohya.create_network(
                1.0, spec.rank, spec.alpha, None,
                encoders if len(encoders) > 1 else (encoders[0] if encoders else None),
                unets[0] if unets else nn.Module(),
                warn_on_unmatched=False, neuron_dropout=spec.dropout, **spec.lycoris_args,
            )
        except (FileNotFoundError, ValueError, AssertionError, KeyError) as exc:
            # OFT types need layer sizes their block size divides: the rank is the setting to change
            field = "network_dim" if "decompose" in str(exc) else "LyCORIS_preset"
            raise NetworkConfigError(f"LyCORIS could not build the network: {exc}", field) from exc
    built = []
    for module, role in [(m, Role.TEXT_ENCODER) for m in network.text_encoder_loras] + \
                        [(m, Role.UNET) for m in network.unet_loras]:
        name = names.get(id(module.org_module[0]))
        if name is None:  # a layer outside the roots Nekoya names (cannot happen with the built-in families)
            raise NetworkConfigError(f"LyCORIS module {module.lora_name} has no kohya name", "LyCORIS_preset")
        module.lora_name = name
        built.append((name, module, role))
    return built


def _no_double_time_embedding(network_class) -> None:
    """LyCORIS 4's presets name both the ``TimestepEmbedding`` class (for Anima) and its layers
    ``time_embedding.linear_1/2`` (for SD): on an SD UNet the two select the same layers and LyCORIS stops on
    "duplicated lora name". Keep the class out while the names are targets: the same layers, once."""
    original = network_class.apply_preset.__func__

    def apply_preset(cls, preset):
        original(cls, preset)
        if any(name.startswith("time_embedding.") for name in cls.UNET_TARGET_REPLACE_NAME):
            cls.UNET_TARGET_REPLACE_MODULE = [m for m in cls.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"]
        return cls

    network_class.apply_preset = classmethod(apply_preset)


def _kohya_names(targets: list[LoraTarget]) -> dict[int, str]:
    """Every module of the targets' roots by identity -> the kohya key name sd-scripts gives it."""
    names: dict[int, str] = {}
    for target in targets:
        for path, module in target.root.named_modules():
            if path:
                names.setdefault(id(module), lora_name(target.prefix, target.path_prefix + path, ""))
    return names


@contextlib.contextmanager
def _kept_class_state(cls):
    """Put the class's own attributes (the preset, apply_preset) back as they were, descriptors included."""
    saved = {name: vars(cls)[name] for name in _PRESET_ATTRIBUTES if name in vars(cls)}
    try:
        yield
    finally:
        for name in _PRESET_ATTRIBUTES:
            if name in saved:
                setattr(cls, name, saved[name])
            elif name in vars(cls):
                delattr(cls, name)


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None):
    """LyCORIS initialises from the global RNG: draw from the run's generator instead, leaving the global one
    as it was."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet():
    """LyCORIS logs a line per setting at INFO; the run log says what matters."""
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
