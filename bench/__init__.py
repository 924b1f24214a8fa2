"""motus_fast benchmark suite: `python -m bench.<name>`; results go to bench/results/ as JSON + markdown."""
