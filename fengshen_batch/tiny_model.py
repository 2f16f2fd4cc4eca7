"""A tiny GPT2 with random weights and a real byte-level BPE tokenizer, built locally in a second.

It stands in for Wenzhong/Yuyuan-GPT2-3.5B where the real weights cannot be fetched (tests, `make demo`): the
same architecture, tokenizer family and file layout (safetensors + vocab.json/merges.txt), just small.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_LINES = [
    "北京位于华北平原的北部，是中国的首都。",
    "糖尿病患者应当控制饮食，少吃含糖量高的食物。",
    "今天天气很好，我们一起去公园散步吧。",
    "人工智能正在改变医疗、教育和交通。",
    "阿司匹林常用于退烧和缓解疼痛。",
    "Diabetics should not eat too much sugar.",
    "Aspirin is used for fever and pain relief.",
    "The patient was treated with insulin and recovered quickly.",
    "Replace me by any text you'd like.",
    "Beijing is the capital of China and lies in the north.",
    "Hypertension increases the risk of stroke and heart disease.",
    "Large language models judge facts by computing perplexity.",
]

EOS = "<|endoftext|>"


def build_tiny_gpt2(
    out_dir: str | Path,
    *,
    n_positions: int = 64,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    vocab_size: int = 400,
    seed: int = 0,
) -> Path:
    """Write a loadable tiny GPT2LMHeadModel + tokenizer to `out_dir` and return it."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SAMPLE_LINES * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS])
    vocab = bpe.get_vocab()
    bpe.save_model(str(out))  # vocab.json + merges.txt
    merges = [tuple(line.split(" ")) for line in (out / "merges.txt").read_text("utf-8").splitlines()[1:]]
    # transformers 5.x builds GPT2 tokenizers from vocab=/merges= directly.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(out)

    eos_id = vocab[EOS]
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        activation_function="gelu_fast",  # as in the 3.5B models
        layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    # Random init gives near-uniform predictions; a larger scale makes distributions peaked, so greedy and
    # sampling tests see real differences between tokens.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out, safe_serialization=True)
    return out
