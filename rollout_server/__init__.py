"""The generation half of gkd-service: a vLLM engine that samples the student and reloads pushed
LoRA adapters in place. The engine knows nothing about transports; transports know nothing about
vLLM: `service.RolloutService` sits between them."""
