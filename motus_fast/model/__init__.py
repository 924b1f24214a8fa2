from motus_fast.model.mot import Conditioning, Motus, MotusBlock

__all__ = ["Conditioning", "Motus", "MotusBlock"]
