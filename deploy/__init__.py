"""Ways to run the service beyond one process: a Ray job (`python -m deploy.ray_job`) and Docker
Compose (`deploy/compose.yaml`). See docs/deployment.md for the exact commands."""
