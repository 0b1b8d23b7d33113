"""The remote code a ``model_type = "fmtrain"`` folder carries, so that any tool loads it with
``trust_remote_code=True``: written by the export (:mod:`.export`) and by every
``save_pretrained`` of :class:`~.modeling.FmtrainForCausalLM` (needs no ``transformers``)."""

# The remote code of a model_type "fmtrain" folder: fmtrain's own classes, imported. transformers
# skips imports inside try/except when it checks a remote file's requirements, so a missing fmtrain
# reaches the user as the message below rather than as a bare package name. The classes are
# subclasses defined here, not fmtrain's imported: save_pretrained copies the file that defines a
# remote class into the new folder, and for fmtrain's own classes that is fmtrain's source (it
# failed with FileNotFoundError on fmtrain/hf/.config.py and left a half-written folder).
REMOTE_CODE = '''"""Remote code of an fmtrain export (multipole attention): transformers runs this file when
the folder is loaded with ``trust_remote_code=True``. The model is fmtrain's own implementation,
so fmtrain must be installed where it runs: ``pip install -e ".[hf]"`` in a clone of fmtrain.
"""
try:
    from fmtrain.hf.modeling import FmtrainConfig as _Config, FmtrainForCausalLM as _Model
except ImportError as exc:
    raise ImportError(
        "this model is an fmtrain export (model_type 'fmtrain', multipole attention) and runs on fmtrain's "
        'own code: install fmtrain with its Hugging Face extra (pip install -e ".[hf]" in a clone of '
        f"fmtrain), then load it again ({exc})") from exc


# Defined in this file so that save_pretrained copies this file (not fmtrain's) to the new folder.
class FmtrainConfig(_Config):
    pass


class FmtrainForCausalLM(_Model):
    config_class = FmtrainConfig


__all__ = ["FmtrainConfig", "FmtrainForCausalLM"]
'''
REMOTE_FILE = "modeling_fmtrain.py"
AUTO_MAP = {"AutoConfig": "modeling_fmtrain.FmtrainConfig",
            "AutoModelForCausalLM": "modeling_fmtrain.FmtrainForCausalLM"}


__all__ = ["AUTO_MAP", "REMOTE_CODE", "REMOTE_FILE"]
