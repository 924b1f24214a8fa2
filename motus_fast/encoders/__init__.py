"""The frozen encoders Motus is fed by, behind one protocol (``Encoders``), with one preprocessing path.

- ``base``: the protocol, pixels <-> [-1, 1], text padding;
- real modules: ``wan_vae`` (Wan2.2 VAE as diffusers ``AutoencoderKLWan``), ``umt5`` (transformers
  ``UMT5EncoderModel``), ``qwen3_vl`` (Qwen3-VL features for the und expert); each loader reads both public layouts;
- ``frozen.FrozenEncoders``: the protocol over those modules; ``load.load_encoders``: from downloaded folders;
- stand-ins: ``stub.StubEncoders``, ``patch_pca.PatchPCAEncoders``, ``tiny.build_tiny_encoders``.
Heavy libraries (diffusers, transformers) are imported only when a loader runs.
"""

from motus_fast.encoders.base import Encoders, pad_text, pixels_to_unit, unit_to_pixels
from motus_fast.encoders.frozen import FrozenEncoders
from motus_fast.encoders.load import WanFiles, load_encoders, wan_files
from motus_fast.encoders.patch_pca import PatchPCAEncoders
from motus_fast.encoders.qwen3_vl import VLMFeatureExtractor, load_qwen3_vl
from motus_fast.encoders.stub import StubEncoders
from motus_fast.encoders.tiny import build_tiny_encoders
from motus_fast.encoders.umt5 import load_umt5
from motus_fast.encoders.wan_vae import WanVAE, load_wan_vae

__all__ = ["Encoders", "FrozenEncoders", "PatchPCAEncoders", "StubEncoders", "VLMFeatureExtractor", "WanFiles",
           "WanVAE", "build_tiny_encoders", "load_encoders", "load_qwen3_vl", "load_umt5", "load_wan_vae",
           "pad_text", "pixels_to_unit", "unit_to_pixels", "wan_files"]
