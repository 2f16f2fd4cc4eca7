"""Model loading from a local dir, from s3:// through a real HTTP S3 endpoint, and clear failures."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch
from transformers import GPT2LMHeadModel

from fengshen_batch.loading import ModelLoadError, fetch_to_cache, load_replica, resolve_dtype
from tests.helpers import make_bucket


def _logits(replica, text="北京位于华北平原"):
    with torch.no_grad():
        return replica.model(torch.tensor([replica.encode(text)])).logits


def test_local_dir_loads_a_gpt2_lm_head_model(replica):
    assert isinstance(replica.model, GPT2LMHeadModel)
    assert replica.dtype == torch.float32 and replica.device.type == "cpu"
    assert replica.max_length == 64
    assert replica.eos_id == replica.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert replica.tokenizer.pad_token_id == replica.eos_id
    assert not any(p.requires_grad for p in replica.model.parameters())


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", cpu)


def test_bfloat16_replica(tiny_model_dir):
    rep = load_replica(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(rep.model.parameters()).dtype == torch.bfloat16


def _upload(fs, local_dir, prefix):
    for f in local_dir.iterdir():
        fs.put(str(f), f"{prefix}/{f.name}")


def test_s3_prefix_downloads_only_what_is_needed_and_loads_the_same_model(
    replica, tiny_model_dir, s3_options, tmp_path
):
    import s3fs

    make_bucket(s3_options, "models")
    fs = s3fs.S3FileSystem(**s3_options)
    _upload(fs, tiny_model_dir, "models/tiny")
    fs.pipe("models/tiny/optimizer.pt", b"not needed")  # training leftovers are not downloaded
    fs.pipe("models/tiny/pytorch_model.bin", b"pickled duplicate: safetensors wins")

    rep = load_replica("s3://models/tiny/", device="cpu", cache_dir=tmp_path, storage_options=s3_options)
    assert torch.equal(_logits(rep), _logits(replica))
    (local,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    names = {p.name for p in local.iterdir()}
    assert "model.safetensors" in names and "optimizer.pt" not in names and "pytorch_model.bin" not in names
    assert fetch_to_cache("s3://models/tiny", tmp_path, s3_options) == (local, False)  # cached: no download


def test_two_concurrent_loads_on_one_node_download_once(tiny_model_dir, s3_options, tmp_path):
    import s3fs

    make_bucket(s3_options, "models")
    _upload(s3fs.S3FileSystem(**s3_options), tiny_model_dir, "models/concurrent")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(fetch_to_cache, "s3://models/concurrent/", str(tmp_path), s3_options)
            for _ in range(2)
        ]
        outcomes = [f.result(timeout=120) for f in futures]
    assert sorted(downloaded for _, downloaded in outcomes) == [False, True]
    assert outcomes[0][0] == outcomes[1][0]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp dirs left behind


def test_pickled_weights_load_through_weights_only(tiny_model_dir, replica, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir, legacy)
    state = {k: v for k, v in replica.model.state_dict().items() if k != "lm_head.weight"}
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin")
    rep = load_replica(str(legacy), device="cpu")
    assert torch.equal(_logits(rep), _logits(replica))


def test_non_gpt2_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model"):
        load_replica(str(tmp_path), device="cpu")


def test_missing_model_and_missing_prefix(tmp_path, s3_options):
    with pytest.raises(ModelLoadError, match="not found"):
        load_replica(str(tmp_path / "nope"), device="cpu")
    make_bucket(s3_options, "models")
    with pytest.raises(ModelLoadError, match="s3://models/absent"):
        load_replica("s3://models/absent/", cache_dir=tmp_path, storage_options=s3_options)


def test_unreachable_hub_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # a closed port on loopback stands for an unreachable hub
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="Hugging Face hub.*local directory or a bucket prefix"):
        load_replica("IDEA-CCNL/Wenzhong-GPT2-3.5B", cache_dir=tmp_path)
    assert time.monotonic() - start < 10
