"""OpenCLIP's text transformer in the original single-file layout (SD 2.x's text encoder, SDXL's second).

transformers' CLIPTextModel holds separate q/k/v projections; OpenCLIP (``open_clip.Transformer``, what LDM/SGM
checkpoints store) holds them as one ``attn.in_proj_weight`` of q, k and v stacked in that order, and names the
rest ``resblocks``, ``ln_1``, ``mlp.c_fc``, ``ln_final``, ``positional_embedding`` (a tensor, not an Embedding).
SGM stores the pooled projection as a matrix applied on the right: the transpose of diffusers' Linear weight.

SD 2.x conditions on the penultimate block of OpenCLIP-H, so diffusers keeps 23 of its 24 blocks and no
projection. AUTOMATIC1111 and ComfyUI build the whole OpenCLIP-H and expect all 24, plus ``text_projection`` and
``logit_scale``: :func:`sd2_filler` adds them the way kohya's converter does. The filler never changes an image,
because the last block's output and the projection are never read.
"""

from colossal_sd.single_file_places import Place

LAYER_MODULES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                 "self_attn.out_proj": "attn.out_proj"}
QKV = ("q_proj", "k_proj", "v_proj")  # OpenCLIP's order inside in_proj


def openclip_names(config) -> dict:
    """diffusers key or module path -> its Place in OpenCLIP's layout, for a CLIPTextModel(WithProjection) config."""
    names = {"text_model.embeddings.token_embedding": "token_embedding",
             "text_model.embeddings.position_embedding.weight": Place("positional_embedding"),
             "text_model.final_layer_norm": "ln_final",
             "text_projection.weight": Place("text_projection", transposed=True)}
    for layer in range(config["num_hidden_layers"]):
        ours, theirs = f"text_model.encoder.layers.{layer}", f"transformer.resblocks.{layer}"
        names.update({f"{ours}.{d}": f"{theirs}.{o}" for d, o in LAYER_MODULES.items()})
        for piece, projection in enumerate(QKV):
            for param in ("weight", "bias"):
                names[f"{ours}.self_attn.{projection}.{param}"] = Place(f"{theirs}.attn.in_proj_{param}", piece)
    return names


def sd2_filler(original: dict, config) -> dict:
    """What UIs expect beyond diffusers' SD 2.x text encoder: the last block once more (a copy of the one before
    it, as kohya writes), an all-ones ``text_projection`` (width x width) and ``logit_scale`` = 1."""
    import torch

    last = config["num_hidden_layers"] - 1
    block = f"transformer.resblocks.{last}."
    filler = {key.replace(block, f"transformer.resblocks.{last + 1}."): tensor.clone()
              for key, tensor in original.items() if key.startswith(block)}
    embedding = original["token_embedding.weight"]
    width = embedding.shape[1]
    filler["text_projection"] = torch.ones((width, width), dtype=embedding.dtype)
    filler["logit_scale"] = torch.tensor(1.0, dtype=embedding.dtype)
    return filler
