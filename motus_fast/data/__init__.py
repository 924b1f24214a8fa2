"""Data: readers (LeRobot v3, upstream RoboTwin layout), windows, image prep, norm stats, mixtures, synthetic.

The path of one training batch (see each module's docstring):

    on disk (lerobot.py, robotwin.py) -> MotusDataset (dataset.py: window, frames, normalised actions)
      -> MixtureDataset + StepSampler (mixture.py: the pyramid; samples a pure function of (seed, step))
      -> DataLoader (workers; RawBatch) -> BatchEncoder (encode.py: VAE, umT5, Qwen3-VL)
      -> FlowBatch (flow.py)

Also: windows.py (which frames a sample reads, upstream's formulas), image.py (layouts, resize-with-pad),
norm.py (statistics, normalize/unnormalize), encoders.py (VAE/umT5/Qwen3-VL interfaces + tiny random ones),
text_cache.py / latent_cache.py (optional caches), latent_actions.py (stage-2 labels), video.py (PyAV),
tiny.py (tiny on-disk datasets and per-stage configs), cli.py (`motus-fast stats`, `motus-fast encode-text`).

Heavy modules (PyAV, pyarrow, diffusers, transformers) are imported where they are used, so importing this package
is cheap.
"""

from motus_fast.data.config import DataConfig, DatasetSpec
from motus_fast.data.errors import DataError
from motus_fast.data.windows import WindowSpec

__all__ = ["DataConfig", "DatasetSpec", "DataError", "WindowSpec"]
