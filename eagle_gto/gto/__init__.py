"""GTO fine-tuning (Group Tree Optimization, Phase II) of EAGLE-3 draft heads.

- trees.py: the engine's draft trees for many training prefixes at once and
  the target's verdict on every node (one forward over all trees);
- reward.py: branch values L_{t,i} and the tree reward (smooth max; mean and
  hard max for the ablation);
- policy.py: groups of adjacent roots, debiased group-standardised
  advantages, the greedy accepted branch, its teacher-forced log-probability,
  the ratio and the clipped surrogate;
- trainer.py: `GTOConfig` (every option and default), the training step
  L = L_token + omega * L_GTO, validation, logging and export;
- checkpoints.py: what a checkpoint holds so that `--resume` continues a
  run as if it had never stopped, and the options a resumed run must share;
- experiment.py: GTO vs continued token-level training with ablations;
- sweep.py: the option sweep, a grid of runs ranked on the validation slice;
- __main__.py: `python -m eagle_gto.gto [experiment|sweep] ...`.
"""

from .trainer import GTOConfig, train

__all__ = ["GTOConfig", "train"]
