"""Model loading from a local dir, from s3:// through a real HTTP S3 endpoint, and clear failures."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch

from fengshen_batch.engine.gpt2 import GPT2
from fengshen_batch.model.load import load_replica, resolve_dtype
from fengshen_batch.model.source import ModelLoadError, fetch_to_cache
from tests.helpers import make_bucket


def _logits(replica, text="北京位于华北平原"):
    model = replica.model
    with torch.no_grad():
        return model.logits(model.hidden(torch.tensor([replica.encode(text)]))[0])  # (T, V)


def test_local_dir_loads_our_gpt2_with_hf_logits(replica, hf_model):
    assert isinstance(replica.model, GPT2)
    assert replica.dtype == torch.float32 and replica.device.type == "cpu"
    assert replica.max_length == 64
    assert replica.eos_id == replica.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert replica.tokenizer.pad_token_id == replica.eos_id
    assert not any(p.requires_grad for p in replica.model.layers[0].__dict__.values())
    ids = torch.tensor([replica.encode("北京位于华北平原")])
    torch.testing.assert_close(_logits(replica), hf_model(ids).logits[0], rtol=1e-5, atol=1e-5)
    assert replica.model.lm_head.data_ptr() == replica.model.wte.data_ptr()  # tied, as GPT2's checkpoint


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", cpu)


def test_bfloat16_replica(tiny_model_dir):
    rep = load_replica(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert rep.model.wte.dtype == rep.model.layers[-1].out_w.dtype == torch.bfloat16


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


def test_pickled_weights_load_through_weights_only(tiny_model_dir, replica, hf_model, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir, legacy)
    # as saved from GPT2Model (the model cards' class): no `transformer.` prefix, no LM head
    state = {
        k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"
    }
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


def test_checkpoint_missing_a_tensor_names_it(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    state = load_file(broken / "model.safetensors")
    name = next(k for k in state if k.endswith("h.1.mlp.c_fc.weight"))
    save_file({k: v for k, v in state.items() if k != name}, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"no tensor 'h\.1\.mlp\.c_fc\.weight'"):
        load_replica(str(broken), device="cpu")


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json + merges.txt"])
def test_our_tokenizer_equals_transformers_autotokenizer(tiny_model_dir, tmp_path, files):
    from transformers import AutoTokenizer

    from fengshen_batch.model.tokenizer import GPT2TextTokenizer
    from fengshen_batch.tiny_model import SAMPLE_LINES

    path = tiny_model_dir
    if files != "tokenizer.json":  # the layout of the Fengshenbang checkpoints: no tokenizer.json
        path = tmp_path / "vocab-merges"
        shutil.copytree(tiny_model_dir, path)
        (path / "tokenizer.json").unlink()
    ours, ref = GPT2TextTokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    texts = [
        *SAMPLE_LINES,
        "before<|endoftext|>after",
        "  two  spaces, tabs\tand\nnewlines ",
        "emoji 🙂 ü ß",
        "",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert len(ours) == len(ref) and ours.eos_token_id == ref.eos_token_id
    ids = list(range(len(ref)))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):  # arbitrary id sequences, partial UTF-8 included, decode the same
        seq = torch.randint(
            0, len(ref), (int(torch.randint(1, 12, (1,), generator=rng)),), generator=rng
        ).tolist()
        assert ours.decode(seq) == ref.decode(seq), seq


def test_a_changed_model_under_the_same_prefix_is_fetched_anew_never_mixed(
    tiny_model_dir, s3_options, tmp_path
):
    """Issue 32, case 5: the cached copy is revalidated on every load (one listing): after the bucket's
    model changes, the next load downloads the new version into its own folder; a load that expects the
    version its job's driver saw is refused once the prefix holds another."""
    import s3fs

    from fengshen_batch.model.source import model_version

    make_bucket(s3_options, "models")
    fs = s3fs.S3FileSystem(**s3_options)
    _upload(fs, tiny_model_dir, "models/changing")
    url = "s3://models/changing/"
    first = model_version(url, s3_options)
    old, downloaded = fetch_to_cache(url, tmp_path, s3_options, expected_version=first)
    assert downloaded and fetch_to_cache(url, tmp_path, s3_options) == (old, False)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    fs.pipe("models/changing/config.json", json.dumps({**config, "retrained": "2026-12-02"}).encode())
    second = model_version(url, s3_options)
    assert second != first
    new, downloaded = fetch_to_cache(url, tmp_path, s3_options)
    assert downloaded and new != old and json.loads((new / "config.json").read_text())["retrained"]
    assert "retrained" not in json.loads((old / "config.json").read_text())
    with pytest.raises(
        ModelLoadError, match=f"changed since the job started \\(version {first}, now {second}\\)"
    ):
        fetch_to_cache(url, tmp_path, s3_options, expected_version=first)
