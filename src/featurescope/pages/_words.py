"""What a page, a report or a terminal says of a model in words."""

from __future__ import annotations

__all__ = ["weights_sentence"]


def weights_sentence(origin: str | None) -> str:
    """Where a model's weights came from, said plainly for a page, a report or a terminal.

    Args:
        origin: :attr:`ModelMetadata.weights <featurescope.zoo.ModelMetadata.weights>`
            (``"random"``, ``"torchvision:IMAGENET1K_V1"``, ``"checkpoint:<sha256 prefix>"``),
            or ``None`` where it is not known.

    Example:
        >>> weights_sentence("random").split(":")[0]
        'Random weights'
        >>> weights_sentence("torchvision:IMAGENET1K_V1")
        'Pretrained weights: torchvision:IMAGENET1K_V1.'
    """
    if origin == "random":
        return (
            "Random weights: this network is untrained, so its maps and neighbours show its "
            "architecture, not anything learned."
        )
    if origin is None:
        return "Weights of unknown origin (not recorded)."
    if origin.startswith("checkpoint:"):
        return f"Weights from a checkpoint (sha256 {origin.removeprefix('checkpoint:')}…)."
    return f"Pretrained weights: {origin}."
