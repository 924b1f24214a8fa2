"""Latent actions from optical flow: what lets the action expert learn from unlabelled video (paper section 4.2).

Pipeline, for a pair of frames ``frame_spacing`` raw frames apart::

    frames --optical flow (OpenCV DIS, or a learned model)--> flow [H, W, 2]
           --colour wheel (fixed scale)--> flow image [3, H, W]
           --DC-AE encoder (diffusers AutoencoderDC; frozen or fine-tuned)--> tokens [N, C] (paper: 4 x 512)
           --lightweight encoder--> mean, log-variance [14] --sample--> z
           --lightweight decoder--> tokens --DC-AE decoder--> flow image (reconstruction)

    loss = L_recon + lambda_a * ||a_real - a_pred||^2 (labelled samples only) + beta * KL,
    lambda_a = 1.0, beta = 1e-6, batches mixing 90% unlabelled / 10% labelled clips.

Modules: ``config`` (frozen dataclasses, presets ``tiny`` and ``motus``), ``optical_flow`` (DIS + learned-model
hook, the flow-image front end), ``colorwheel`` (flow <-> RGB, exact inverse), ``dcae`` (AutoencoderDC loading and
tokens), ``model`` (the VAE and its loss), ``frames`` (frame sources: mp4 directories, LeRobot/RoboTwin datasets,
in-memory), ``data`` (flow clips, labelled/unlabelled mix), ``train`` (trainer), ``checkpoint``, ``label`` (the
labelling command's writer), ``synthetic`` (moving-square videos with known motion), ``cli`` (the commands).

**Frame spacing.** One latent action spans ``frame_spacing`` raw frames of the source video: row k of an episode's
latent actions is the motion from raw frame ``k * s`` to ``(k + 1) * s``. The paper leaves s open; the default is
6 because upstream's stage-2 data loader takes one latent action every 6 raw frames (so s must equal the stage-2
data's frame stride: ``LatentActionConfig.frame_spacing``, recorded in every checkpoint and in the labels'
meta.json). A model is trained and applied at one spacing: motion magnitudes, and so ``flow.max_flow``, scale with
it. When datasets differ in frame rate, pick s per dataset so that s / fps is about the same time span (0.2 s at
30 fps with s = 6).

**Output of ``motus-fast label-latent-actions``** (read by ``motus_fast.data.latent_actions.LatentActionStore``):
``<out>/latent_actions/episode_<index:06d>.npy`` float32 ``[n_steps, 14]`` (the posterior means;
``n_steps = (T - 1) // s`` for a T-frame episode) plus ``<out>/latent_actions/meta.json`` with ``dim``,
``frame_spacing``, the checkpoint path and step, the config hash, per-dimension stats and per-episode fps and
lengths. ``label.py`` documents every field.
"""

from motus_fast.latent_action.config import (DCAEConfig, LatentActionConfig, LatentActionModelConfig,
                                             LatentActionTrainConfig, OpticalFlowConfig, get_preset)

__all__ = ["DCAEConfig", "LatentActionConfig", "LatentActionModelConfig", "LatentActionTrainConfig",
           "OpticalFlowConfig", "get_preset"]
