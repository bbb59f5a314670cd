"""The learner: on-policy GKD with a LoRA student, pulling rollouts and pushing adapters.

Importing this package is cheap (no torch): `gkd-learner --help` must answer instantly. The heavy
modules (`recipe`, `models`, `data`, ...) are imported only when a run starts.
"""
