"""anoseg search orchestrator (Ray Tune + Optuna); anoseg itself never imports this package."""
