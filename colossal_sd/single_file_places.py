"""Where each diffusers tensor sits in an original (LDM/SGM) single file: one name map, used both ways.

A part's name map takes diffusers paths to original ones. A path is a module (its weights keep their names
below it) or a whole key; a key's value may be a :class:`Place` when the tensor is stored differently: as one
third of a q/k/v stack, transposed, or as a 1x1 convolution. Writing and reading walk the same map, so a tensor
written by :func:`to_original` is exactly the one :func:`from_original` gives back.
"""

from dataclasses import dataclass, replace
from typing import Optional

from colossal_sd.errors import UserError


@dataclass(frozen=True)
class Place:
    key: str  # the original layout's key (or module path), below the part's prefix
    piece: Optional[int] = None  # which third of a stacked q/k/v tensor (OpenCLIP's in_proj)
    transposed: bool = False  # stored as the transpose of diffusers' tensor (SGM's text_projection)
    conv1x1: bool = False  # a Linear weight stored as a 1x1 convolution (the LDM VAE's attention)


def locate(key: str, names: dict) -> Optional[Place]:
    """The Place of a diffusers key: the whole key if the map names it, else its longest named module path."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        found = names.get(".".join(parts[:cut]))
        if found is not None:
            found = found if isinstance(found, Place) else Place(found)
            return replace(found, key=".".join([found.key, *parts[cut:]]))
    return None


def _place(key: str, names: dict, component: str) -> Optional[Place]:
    place = locate(key, names)
    if place is None and not key.endswith("position_ids"):  # a buffer some transformers versions save
        raise UserError(f"{component} weight '{key}' has no place in the original Stable Diffusion layout")
    return place


def to_original(state_dict: dict, names: dict, component: str) -> dict:
    """One part's diffusers state dict -> its tensors under original names (no prefix)."""
    import torch

    original, stacks = {}, {}
    for key, tensor in state_dict.items():
        place = _place(key, names, component)
        if place is None:
            continue
        if place.piece is not None:
            stacks.setdefault(place.key, [None] * 3)[place.piece] = tensor
        elif place.transposed:
            original[place.key] = tensor.T.contiguous()
        else:
            original[place.key] = tensor.reshape(*tensor.shape, 1, 1) if place.conv1x1 else tensor
    for key, pieces in stacks.items():
        if any(piece is None for piece in pieces):
            raise UserError(f"{component}: '{key}' lacks one of its q/k/v projections")
        original[key] = torch.cat(pieces)
    return original


def from_original(checkpoint: dict, prefix: str, expected: dict, names: dict, component: str, path) -> dict:
    """A part's diffusers state dict, read from the file for the keys and shapes in `expected`."""
    state = {}
    for key, want in expected.items():
        place = _place(key, names, component)
        if place is None:
            continue
        source = prefix + place.key
        if source not in checkpoint:
            raise UserError(f"'{path}' has no {component} weight '{source}': it is not a Stable Diffusion single "
                            "file of the architecture its config describes (see --single_file_config)")
        tensor = checkpoint[source]
        if place.piece is not None:
            tensor = tensor.chunk(3)[place.piece]
        if place.transposed:
            tensor = tensor.T
        if tensor.numel() != want.numel():
            raise UserError(f"'{path}': {component} weight '{source}' has shape {tuple(checkpoint[source].shape)}, "
                            f"its config expects {tuple(want.shape)}; pass the matching --single_file_config")
        state[key] = tensor.reshape(want.shape).to(want.dtype).contiguous()  # reshape undoes the 1x1 convs
    return state
