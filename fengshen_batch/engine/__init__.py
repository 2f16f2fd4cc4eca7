"""The generation engine: continuous batching over one GPT2 replica (plain PyTorch, no Ray).

sequence.py      a request (prompt, n samples, its limit) and each sample's state
scheduler.py     which sequences run next: chunked prefill within a token budget, or one decode step
kv_cache.py      the slot KV cache, allocated once per replica and sized from memory
prefix_cache.py  which slots hold which prompt prefixes (chained block hashes): shared prefixes computed once
gpt2.py          our GPT2 forward over the checkpoint's weights, reading and writing that cache
model_runner.py  a scheduled step -> tensors -> logits (CUDA graphs for decode on GPU)
sampler.py       repetition penalty, temperature, top-k/top-p, keyed reproducible draws
stop.py          incremental stop-string checks on each new token's bytes
llm_engine.py    the loop (schedule, run, sample, update), and a thread that keeps it fed
replica.py       one model replica on one device (model, tokenizer, EOS id): what the engine runs on
"""
