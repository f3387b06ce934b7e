"""The names a chapter's parameters may take: models, memory sites and kinds, latent methods (all chapters).

They live here, free of torch, so that ``python -m fastmem.book`` checks a parameter set in a
fraction of a second, before any kernel starts; the modules that implement each name import it
from here.
"""

from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
HUB_MODELS = {
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-xl": "google/flan-t5-xl",
}
TINY_MODELS = ("tiny-gpt-neox", "tiny-t5")
KNOWN_MODELS = (DEFAULT_MODEL, *HUB_MODELS, *TINY_MODELS)

ATTRACTOR_SITES = ("attn", "residual")
ATTRACTOR_INITS = ("tokens", "random")
VALUE_KINDS = ("iterated", "single_step")
LATENT_METHODS = ("m1", "m2", "m3", "m4", "m5", "m6")


def is_model_folder_name(name: str) -> bool:
    """Is a model name a local folder: it starts with ``.``, ``/`` or ``~``, or exists on disk (all chapters)?"""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
