"""The generation engine: continuous batching over one GPT2 replica (plain PyTorch, no Ray).

sequence.py      a request (prompt, n samples, its limit) and each sample's state
scheduler.py     which sequences run next: chunked prefill within a token budget, or one decode step; preemption
kv_cache.py      the paged KV cache: fixed-size blocks allocated once per replica, sized from memory
block_manager.py block tables: free list, reference counts, prefix blocks shared by hash, copy on write
attention.py     CPU decode attention over the block tables, in place (compiled once per process)
gpt2.py          our GPT2 forward over the checkpoint's weights, reading and writing that cache
model_runner.py  a scheduled step -> tensors -> logits (CUDA graphs for decode on GPU)
sampler.py       repetition penalty, temperature, top-k/top-p, keyed reproducible draws
stop.py          incremental stop-string checks on each new token's bytes
llm_engine.py    the loop (schedule, run, sample, update), and a thread that keeps it fed
replica.py       one model replica on one device (model, tokenizer, EOS id): what the engine runs on
"""
