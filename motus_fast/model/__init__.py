from motus_fast.model.mot import ConditionCache, Conditioning, Motus, MotusBlock

__all__ = ["ConditionCache", "Conditioning", "Motus", "MotusBlock"]
