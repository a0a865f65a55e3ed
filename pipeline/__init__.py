"""rsp: robust sparse networks, from training to the edge."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """The eval-mode nn.Module of any rsp stage folder (input NCHW floats in [0, 1], output logits).

    Nothing is unpickled: the architecture comes from manifest.json, the weights from model.safetensors.
    """
    from .artifacts import load_model as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_model"]
