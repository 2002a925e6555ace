"""Measuring what a split run leaks: an honest-but-curious cloud inverts the cut rows
back to input tokens (`cotune attack RUN_DIR`). See `inversion` for the attacker."""

from cotune.attack.cut_attack import attack_config, attack_run

__all__ = ["attack_config", "attack_run"]
