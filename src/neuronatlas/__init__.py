"""neuronatlas: map the FFN neurons of Hugging Face transformers.

>>> import neuronatlas as na
>>> atlas = na.profile("path/to/model", "corpus.jsonl", label_field="lang")  # doctest: +SKIP
>>> atlas.summary()["dead_fraction_per_layer"]  # doctest: +SKIP

Importing the package loads nothing heavy and changes no global state.
"""

__version__ = "0.1.0"

__all__ = ["NeuronAtlasError", "profile", "Atlas", "load_atlas", "merge_atlases", "read_corpus", "locate_neurons"]


def __getattr__(name):
    # Lazy attributes keep `import neuronatlas` free of torch/transformers imports.
    if name == "NeuronAtlasError":
        from .errors import NeuronAtlasError

        return NeuronAtlasError
    if name == "profile":
        from .profile import profile

        return profile
    if name in ("Atlas", "load_atlas"):
        from . import atlas

        return getattr(atlas, name)
    if name == "merge_atlases":
        from .atlas_merge import merge_atlases

        return merge_atlases
    if name == "read_corpus":
        from .corpus import read_corpus

        return read_corpus
    if name == "locate_neurons":
        from .models import locate_neurons

        return locate_neurons
    raise AttributeError(f"module 'neuronatlas' has no attribute {name!r}")
